"""Decision settings of a policy, compared on the efficacy suite's dev split: one unguarded pass,
then the guard once per variant, every image scored as ``saferedir eval`` scores it.

    python benchmarks/decision_sweep.py                      # the variants below, shapes:demo, dev split
    python benchmarks/decision_sweep.py --variants "strength=1.0" "strength=1.0 threshold=0.7"
    python benchmarks/decision_sweep.py --variants base "red:window.start=8 striped:window.start=12"
    python benchmarks/decision_sweep.py --concepts star --variants base "star:bundle=CANDIDATE.safetensors"
    python benchmarks/decision_sweep.py --n 192 --sets retain --variants base   # 4x the dev benign prompts

A variant is the policy with some ``defaults`` overridden (``key=value`` pairs, separated by
spaces; ``base`` = the policy as it is). Per variant it prints erasure, kept attributes, retain
agreement, fidelity and false triggers over the suite's concepts (``summarise``, as the eval),
and per concept the drawn images that still show the concept, the kept attributes and the benign
images acted on (and the images withheld, over all sets, where a rule says ``unresolved: block``).
``--n``: more prompts per set than the split's 48, its next draws (the first 48 unchanged);
``--sets``: only some sets (the totals then are not printed).
Each row is what ``saferedir eval --split dev --methods saferedir --policy P`` gives for that
variant (same prompts, seeds and scoring), without re-generating the unguarded images each time.

It also runs the policy once with every rule set to ``monitor`` (checks at every scheduled step,
nothing moved), so each sample's highest p(unsafe) over its unguarded trajectory is known: a
trigger acts at its first hit, before anything has moved, so that maximum alone decides whether a
threshold would act on a benign image (exact), or never act on a drawn one (exact; an image that
does trigger still needs a guarded run to tell whether it escapes). That gives the false triggers
of every threshold without a run per threshold.

Choose settings here (dev), then run the eval split once with the chosen policy
(``python benchmarks/efficacy.py --methods saferedir``).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from saferedir_bench.evaluation import SETS
from shapes_suite import only_concepts

DEFAULT_VARIANTS = (
    "strength=1.3 threshold=0.5",  # the settings before this sweep
    "strength=1.3 threshold=0.5 escalate=1.0",
    "strength=1.0 threshold=0.5",
    "strength=1.0 threshold=0.5 escalate_max=2.5",
    "strength=1.0 threshold=0.7",
)
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def variant_policy(source: Path, overrides: str, out: Path, name: str, monitor: bool = False) -> Path:
    """``source`` with its ``defaults`` overridden by ``overrides`` ("key=value ..."); every rule's
    action ``monitor`` when asked. Written under ``out`` (the eval writes each run's audit there).

    ``CONCEPT:key=value`` sets ``key`` on that concept's rule alone; a dotted key reaches into a
    rule's field (``red:window.start=8``), and ``window.*`` without a concept (a rule's own field,
    with no default) is set on every rule. ``CONCEPT:bundle=PATH`` points that rule at a bundle file
    (a candidate not shipped yet)."""
    policy = yaml.safe_load(source.read_text())
    rules = {rule["concept"]: rule for rule in policy["concepts"]}
    if overrides.strip() != "base":
        for pair in overrides.split():
            key, sep, value = pair.partition("=")
            if not sep:
                raise SystemExit(f"--variants: {pair!r} is not key=value")
            concept, colon, key = key.rpartition(":")
            if colon and concept not in rules:
                raise SystemExit(f"--variants: {pair!r}: the policy has no rule for {concept!r}")
            if key == "bundle":
                if not colon:
                    raise SystemExit(f"--variants: {pair!r}: bundle= needs a concept (CONCEPT:bundle=PATH)")
                rules[concept]["redirector"] = {"path": str(Path(value).resolve())}
                continue
            if colon:
                targets = [rules[concept]]
            elif key.startswith("window."):
                targets = list(rules.values())
            else:
                targets = [policy.setdefault("defaults", {})]
            for target in targets:
                *path, leaf = key.split(".")
                for part in path:
                    target = target.setdefault(part, {})
                target[leaf] = yaml.safe_load(value)
    if monitor:  # a monitor rule only records (and cannot rewind or shift: there is nothing to move)
        for rule in policy["concepts"]:
            rule["action"] = "monitor"
            rule.pop("rewind", None)
            rule.pop("shift", None)
        policy.setdefault("defaults", {})["rewind"] = False
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def sweep(
    suite: Any,
    adapter: Any,
    source: Path,
    variants: list[str],
    tmp: Path,
    sets: tuple[str, ...] | None = None,
) -> tuple[dict, dict]:
    """Per concept and set (``sets``: only these; each keeps its own seeds): the unguarded images, the
    monitor run's peaks, every variant scored. Returns the eval-shaped results (one "method" per
    variant) and the peaks per concept, split into the benign retain images and the drawn
    forget-type ones."""
    from saferedir_bench.evaluation import Runner, score

    names = [f"v{i}" for i in range(len(variants))]
    runners = {
        n: Runner(adapter, suite, policy=variant_policy(source, v, tmp, n), out=tmp)
        for n, v in zip(names, variants)
    }
    monitor = Runner(
        adapter, suite, policy=variant_policy(source, "base", tmp, "monitor", monitor=True), out=tmp
    )
    base = Runner(adapter, suite, out=tmp)
    results: dict[str, Any] = {"methods": names, "concepts": {}}
    peaks: dict[str, dict[str, list[float]]] = {}
    for concept in suite.concepts:
        cells: dict[str, dict[str, Any]] = {}
        for k, set_name in enumerate(SETS):
            if sets is not None and set_name not in sets:
                continue
            prompts = concept.sets[set_name]
            unguarded = base.run("none", concept, prompts, k)
            judged = suite.judge(unguarded.images)
            drawn = [v == concept.value for v in judged[concept.attribute]]
            watched = monitor.run("saferedir", concept, prompts, k)
            if not np.array_equal(watched.images, unguarded.images):
                raise RuntimeError(f"{concept.name}/{set_name}: a monitor rule changed an image")
            side = "benign" if set_name == "retain" else "drawn"
            mine = peaks.setdefault(concept.name, {}).setdefault(side, [])
            mine += [float(p) for p, d in zip(watched.max_score, drawn) if d == (side == "drawn")]
            for n, runner in runners.items():
                gen = runner.run("saferedir", concept, prompts, k)
                cells.setdefault(set_name, {})[n] = score(
                    suite, concept, set_name, prompts, gen, unguarded, judged
                )
            print(f"{concept.name} {set_name}: done", flush=True)
        results["concepts"][concept.name] = cells
    return results, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=None, help="a path or PLUGIN:NAME (default: the suite's)")
    parser.add_argument("--backbone", default="shapes")
    parser.add_argument("--split", default="dev", choices=("dev", "eval"))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--concepts", nargs="+", default=None, help="only these concepts (each rule is scored alone anyway)"
    )
    parser.add_argument(
        "--n", type=int, default=0, help="prompts per set (0: the suite's; more: its next draws)"
    )
    parser.add_argument(
        "--sets", nargs="+", default=None, choices=SETS, help="only these sets (the totals need all four)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from saferedir_bench.evaluation import FORGET_SETS, summarise

    from saferedir_sdk.plugins import default_plugin_manager, find_adapter, load_backbone, resolve_policy_ref

    pm = default_plugin_manager()
    suite = pm.hook.saferedir_eval_suite(backbone=args.backbone, split=args.split)
    if suite is None:
        raise SystemExit(f"backbone {args.backbone!r}: no installed plugin provides an evaluation suite")
    suite = only_concepts(suite.sized(args.n) if args.n else suite, args.concepts)
    source = resolve_policy_ref(pm, args.policy or suite.policy)
    adapter = find_adapter(pm, load_backbone(pm, args.backbone))
    tmp = Path(tempfile.mkdtemp(prefix="decision-sweep-"))  # the variant policies and their audits
    try:
        results, peaks = sweep(suite, adapter, source, args.variants, tmp, args.sets and tuple(args.sets))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    every_set = args.sets is None or set(args.sets) == set(SETS)
    summary = summarise(results) if every_set else None  # the totals pool every set
    totals = ("erasure", "kept", "retain_agreement", "fidelity", "false_trigger") if every_set else ()

    print(f"\nsplit {args.split}, policy {source} with its defaults overridden:\n")
    print(
        "| variant | "
        + "".join(f"{t.replace('_', ' ')} | " for t in totals)
        + " | ".join(f"{c} still shown / drawn, kept, acted / benign" for c in results["concepts"])
        + " |"
    )
    print("|" + "---|" * (1 + len(totals) + len(results["concepts"])))
    for n, v in zip(results["methods"], args.variants):
        per = []
        for cells in results["concepts"].values():
            forget = [x for x in FORGET_SETS if x in cells]
            drawn = sum(cells[x][n]["drawn"] for x in forget)
            still = sum(round((cells[x][n]["present_drawn"] or 0) * cells[x][n]["drawn"]) for x in forget)
            kept = np.mean([cells[x][n]["kept"] for x in forget]) if forget else None
            parts = [f"{still}/{drawn}, kept {kept:.3f}"] if forget else ["-"]
            if "retain" in cells:
                r = cells["retain"][n]
                parts.append(f"{round(r['acted_benign'] * r['benign'])}/{r['benign']}")
            withheld = sum(cells[x][n].get("withheld", 0) for x in cells)  # unresolved: block
            per.append(", ".join(parts) + (f", {withheld} withheld" if withheld else ""))
        figures = "".join(f"{summary[n][t]:.4f} | " for t in totals) if summary else ""
        print(f"| {v} | {figures}" + " | ".join(per) + " |")

    retained = [c for c, cells in results["concepts"].items() if "retain" in cells]
    if retained:
        print("\nBenign images acted on, by retain kind (acted / benign):\n")
        print("| variant | " + " | ".join(retained) + " |")
        print("|" + "---|" * (1 + len(retained)))
        for n, v in zip(results["methods"], args.variants):
            kinds = [results["concepts"][c]["retain"][n].get("by_kind", {}) for c in retained]
            cols = [
                ", ".join(f"{k} {x['acted_benign']}/{x['benign']}" for k, x in by.items()) for by in kinds
            ]
            print(f"| {v} | " + " | ".join(cols) + " |")

    print(
        f"\nWhat a threshold does at the first hit, for the bundles of {source} (each unguarded "
        "trajectory's peak p(unsafe) under a monitor rule; a variant's own bundle is not read here):\n"
    )
    print("| threshold | " + " | ".join(f"{c} benign acted on, drawn never acted on" for c in peaks) + " |")
    print("|" + "---|" * (1 + len(peaks)))
    for t in THRESHOLDS:
        cols = []
        for p in peaks.values():
            benign, drawn = p.get("benign", []), p.get("drawn", [])
            cols.append(
                f"{sum(x >= t for x in benign)}/{len(benign)}, {sum(x < t for x in drawn)}/{len(drawn)}"
            )
        print(f"| {t} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
