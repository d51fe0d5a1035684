"""What the benchmarks of the Shapes efficacy suite share: the suite cut to some concepts, the
shipped bundles (or candidates), the Shapes backbone's adapter, and a wordings file as a concept's
one forget-type set. Imported by decision_sweep.py, deciding_checks.py, redirection_quality.py and
guarded_wordings.py (each run as a script from this folder)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def only_concepts(suite: Any, names: list[str] | None) -> Any:
    """``suite`` with only the concepts ``names`` (all of them when None); an unknown name exits."""
    if not names:
        return suite
    known = [c.name for c in suite.concepts]
    if unknown := sorted(set(names) - set(known)):
        raise SystemExit(f"--concepts: the suite has no concept {unknown} (it has {known})")
    return dataclasses.replace(suite, concepts=[c for c in suite.concepts if c.name in names])


def suite_bundles_adapter(
    split: str, concepts: list[str] | None, overrides: list[str], n: int = 0
) -> tuple[Any, dict[str, Path], Any]:
    """The Shapes efficacy suite's ``split`` (only ``concepts``, if given; ``n`` prompts per set, if
    given), each concept's bundle (the shipped one, or ``CONCEPT=PATH`` from ``overrides``) and the
    Shapes backbone's adapter."""
    from saferedir_shapes.plugin import bundle_path

    from saferedir_sdk.plugins import default_plugin_manager, find_adapter, load_backbone

    pm = default_plugin_manager()
    suite = pm.hook.saferedir_eval_suite(backbone="shapes", split=split)
    suite = only_concepts(suite.sized(n) if n else suite, concepts)
    bundles = {c.name: Path(bundle_path(c.name, "sd")) for c in suite.concepts}  # the shipped ones
    for pair in overrides:
        concept, sep, path = pair.partition("=")
        if not sep or concept not in bundles:
            raise SystemExit(
                f"--bundle: expected CONCEPT=PATH for a concept of {sorted(bundles)}, got {pair!r}"
            )
        bundles[concept] = Path(path)
    return suite, bundles, find_adapter(pm, load_backbone(pm, "shapes"))


def wordings(concept: Any, path: Path) -> Any:
    """``concept`` with FILE's wordings (``kind<TAB>text`` a line) as its one forget-type set."""
    from saferedir_bench.evaluation import EvalPrompt

    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        kind, sep, text = line.partition("\t")
        if not sep or not text.strip():
            raise ValueError(f"{path}:{number}: expected 'kind<TAB>text', got {line!r}")
        prompts.append(EvalPrompt(text.strip(), {concept.attribute: concept.value}, kind.strip()))
    return dataclasses.replace(
        concept, sets={"forget": prompts, "paraphrase": [], "adversarial": [], "retain": []}
    )


def with_wordings(suite: Any, path: Path) -> Any:
    """``suite`` (of one concept) with FILE's wordings as that concept's one forget-type set."""
    return dataclasses.replace(suite, concepts=[wordings(suite.concepts[0], path)])
