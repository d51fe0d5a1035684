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
    python plugins/shapes/red_handwritten_pairs.py OUT.json --also red_heldout7_descriptions.tsv

``--also`` adds more spent files of ``benchmarks/prompts/`` after SPENT's, for a candidate fit
(benchmarks/README.md, "An eighth held-out set": the seventh file added, measured, not shipped).
"""

from __future__ import annotations

import argparse
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


def spent_prompts(also: tuple[str, ...] = ()) -> list[str]:
    """Every prompt of the SPENT files, then of ``also``'s, in file and line order."""
    return [p for name in (*SPENT, *also) for p in file_prompts(PROMPTS / name)]


def handwritten_pairs(also: tuple[str, ...] = ()) -> dict[str, list]:
    """The pairs file's content: ``{"pairs": [[forget, retain], ...], "retain_pool": [...]}``."""
    from saferedir_shapes.world import cached_recipe

    pairs, pool = cached_recipe("red", "descriptions")
    return {"pairs": [list(p) for p in pairs], "retain_pool": [*pool, *spent_prompts(also)]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--also", nargs="+", default=[], metavar="FILE", help="more spent files (names)")
    args = parser.parse_args(argv)
    for name in args.also:
        if name in SPENT or not (PROMPTS / name).is_file():
            parser.error(f"--also {name}: expected a wordings file of {PROMPTS} not already in SPENT")
    args.out.write_text(json.dumps(handwritten_pairs(tuple(args.also))), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
