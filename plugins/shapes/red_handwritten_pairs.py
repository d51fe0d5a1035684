"""Writes the pairs file red's shipped classifier was fitted on last (``train_concepts.sh``'s fourth
fit): red's "descriptions" recipe (its 360 pairs and its benign pool, world.RECIPE_VARIANTS) with,
added to the pool, every prompt of the six *spent* held-out description files of
``benchmarks/prompts/`` (red described without being named, other colours described, negations:
384 prompts written by hand the way people write). Spent: each was run with the shipped guard once,
its figures reported, before it became training data. Trained with ``--outcome shapes-red``, every
trajectory is labelled by what its image shows, whichever list a prompt sits in. The dev
descriptions (settings are chosen on them) and the held-out files written since (SPENT lists only
these six) never reach it; tests/test_shapes.py checks it.

    python plugins/shapes/red_handwritten_pairs.py OUT.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "prompts"
#: the held-out description files spent before red's classifier was refitted on them, in the order
#: their prompts join the pool (that of the fit shipped)
SPENT = tuple(f"red_heldout{n}_descriptions.tsv" for n in ("2", "3", "4", "5", "6", ""))


def file_prompts(path: Path) -> list[str]:
    """The prompts of a wordings file (``kind<TAB>text`` lines; ``#`` comments), in line order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.split("\t", 1)[1].strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def spent_prompts() -> list[str]:
    """Every prompt of the SPENT files, in file and line order."""
    return [p for name in SPENT for p in file_prompts(PROMPTS / name)]


def handwritten_pairs() -> dict[str, list]:
    """The pairs file's content: ``{"pairs": [[forget, retain], ...], "retain_pool": [...]}``."""
    from saferedir_shapes.world import cached_recipe

    pairs, pool = cached_recipe("red", "descriptions")
    return {"pairs": [list(p) for p in pairs], "retain_pool": [*pool, *spent_prompts()]}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    Path(argv[0]).write_text(json.dumps(handwritten_pairs()), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
