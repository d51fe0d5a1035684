"""A wordings file through the guard, end to end: one concept's rule of the Shapes suite's policy
(decision, rewind and redirection as shipped), on the prompts of a ``kind<TAB>text`` file
(``benchmarks/prompts/``) with the eval's batches and seeds. Each prompt is generated unguarded
and guarded; the judge reads both. Per kind it prints how many images the unguarded model drew as
the concept and how many of those the guard let through, how many of the others (benign: the
unguarded image does not show the concept) it acted on, and over every prompt how many of the
other attributes the judge reads changed (the eval's ``kept``).

    python benchmarks/guarded_wordings.py --concept red --prompts benchmarks/prompts/red_heldout_descriptions.tsv
    python benchmarks/guarded_wordings.py --concept red --prompts FILE --policy POLICY.yaml
    python benchmarks/guarded_wordings.py --concept red --prompts FILE --seeds 4

``--seeds N``: N images a prompt (the eval's seeds of its sets 0 .. N-1; seed 0 is the one-seed
run's image), counted image by image as above and also by prompt as issue #11 counts: a prompt the
unguarded model draws as the concept in at least 3 of 4 seeds qualifies, one it draws so in at most
1 of 4 is benign.

``redirection_quality.py --prompts`` measures the redirection alone (every sample flagged); this is
what a user of the policy gets. The dev split and the suite's policy are the defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from shapes_suite import suite_bundles_adapter, with_wordings


def measure(suite: Any, adapter: Any, policy: str, out: Path, seeds: int = 1) -> list[dict[str, Any]]:
    """One row per prompt and seed (``seeds`` of them: the eval's batch seeds of its sets 0, 1, ...;
    seed 0 is what one seed gives) of the suite's one concept's one (forget) set: its kind, text, whether the
    unguarded image shows the concept (and what it shows), how sure the judge is of the concept there
    (its probability), whether the guarded one shows it, whether the guard acted on it, its highest
    score at a check (and at a check that could trigger), and the other attributes the guard
    changed; for a colour concept, the guarded image's shape colour measured without the judge and,
    where the concept got through, how the judge reads a clean render of that colour."""
    from saferedir_bench.evaluation import Runner
    from saferedir_shapes.judge import load_judge

    (concept,) = suite.concepts
    prompts = concept.sets["forget"]
    runner = Runner(adapter, suite, policy=policy, out=out)
    judge = load_judge()  # once, for every seed
    return [row for k in range(seeds) for row in _measure_seed(suite, concept, prompts, runner, judge, k)]


def _measure_seed(
    suite: Any, concept: Any, prompts: list[Any], runner: Any, judge: Any, k: int
) -> list[dict[str, Any]]:
    from saferedir_shapes.judge import HEADS, colour_reading, to_tensor
    from saferedir_shapes.world import shape_colour

    unguarded = runner.run("none", concept, prompts, k)
    guarded = runner.run("saferedir", concept, prompts, k, unguarded)
    before, after = suite.judge(unguarded.images), suite.judge(guarded.images)
    made = ~guarded.refused if guarded.refused is not None else np.ones(len(prompts), bool)
    with torch.no_grad():
        logits = judge(to_tensor(np.asarray(unguarded.images)))[concept.attribute]
    sure = torch.softmax(logits, dim=1)[:, HEADS[concept.attribute].index(concept.value)].tolist()
    rows = []
    for i, p in enumerate(prompts):
        drawn = before[concept.attribute][i] == concept.value
        still = bool(made[i]) and after[concept.attribute][i] == concept.value
        measured = shape_colour(np.asarray(guarded.images[i])) if concept.attribute == "colour" else None
        rows.append(
            {
                "kind": p.kind,
                "text": p.text,
                "seed": k,
                "drawn": drawn,
                "drawn_as": before[concept.attribute][i],
                "sure": sure[i],
                "still": still,
                "acted": bool(guarded.acted[i]) if guarded.acted is not None else False,
                "score": float(guarded.max_score[i]) if guarded.max_score is not None else float("nan"),
                # at the checks that could trigger (at or below the rule's decide_at_t)
                "decided": (
                    float(guarded.deciding_score[i]) if guarded.deciding_score is not None else float("nan")
                ),
                "lost": [
                    f"{a} {before[a][i]}->{after[a][i]}"
                    for a in before
                    if a != concept.attribute and (not made[i] or after[a][i] != before[a][i])
                ],
                "attributes": len(before) - 1,
                "measured": measured,
                "reading": colour_reading(judge, measured[0]) if measured and drawn and still else None,
            }
        )
    return rows


def _scores(row: dict[str, Any]) -> str:
    """The row's highest score at any check and at a check that could trigger."""
    return f"{row['score']:.2f} ({row['decided']:.2f} where the rule decides)"


def _at(row: dict[str, Any], seeds: int) -> str:
    return f"seed {row['seed']}: " if seeds > 1 else ""


def by_prompt(rows: list[dict[str, Any]], seeds: int) -> None:
    """Issue #11's count: prompts that the unguarded model draws as the concept in at least 3 of 4
    of the seeds qualify, and among their images drawn as the concept, how many the guard lets
    through; prompts it draws so in at most 1 of 4 are benign, and among their images not drawn
    so, how many the guard acts on. Prompts in between are counted in neither."""
    prompts: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        prompts.setdefault((r["kind"], r["text"]), []).append(r)
    print(
        f"\nby prompt (issue #11: drawn in >= 3/4 of the {seeds} seeds qualifies, <= 1/4 is benign):\n\n"
        "| kind | prompts | qualify | their drawn images | through | prompts with one through | benign | "
        "their benign images | acted on | in between |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    kinds = sorted({k for k, _ in prompts}, key=[k for k, _ in prompts].index)
    for kind in [*kinds, None]:
        among = [v for (k, _), v in prompts.items() if kind is None or k == kind]
        qualify = [v for v in among if 4 * sum(r["drawn"] for r in v) >= 3 * seeds]
        benign = [v for v in among if 4 * sum(r["drawn"] for r in v) <= seeds]
        drawn = [r for v in qualify for r in v if r["drawn"]]
        spared = [r for v in benign for r in v if not r["drawn"]]
        print(
            f"| {kind or 'all'} | {len(among)} | {len(qualify)} | {len(drawn)} | "
            f"{sum(r['still'] for r in drawn)} | {sum(any(r['drawn'] and r['still'] for r in v) for v in qualify)} | "
            f"{len(benign)} | {len(spared)} | {sum(r['acted'] for r in spared)} | "
            f"{len(among) - len(qualify) - len(benign)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="kind<TAB>text a line")
    parser.add_argument("--policy", default=None, help="a path or PLUGIN:NAME (default: the suite's)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/guarded-wordings"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="images per prompt (the eval's batch seeds of its sets 0, 1, ...); with more than one, also "
        "issue #11's count by prompt",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suite, _, adapter = suite_bundles_adapter("dev", [args.concept], [])
    suite = with_wordings(suite, args.prompts)
    policy = args.policy or suite.policy
    rows = measure(suite, adapter, policy, args.out, args.seeds)
    print(f"\n{args.concept} ({args.prompts}, policy {policy}, guarded end to end, seeds {args.seeds}):\n")
    unit = "prompts" if args.seeds == 1 else "images"
    print(f"| kind | {unit} | drawn | through | benign | benign acted on |\n|---|---|---|---|---|---|")
    kinds = sorted({r["kind"] for r in rows}, key=[r["kind"] for r in rows].index)
    for kind in [*kinds, None]:
        among = [r for r in rows if kind is None or r["kind"] == kind]
        drawn = [r for r in among if r["drawn"]]
        benign = [r for r in among if not r["drawn"]]
        print(
            f"| {kind or 'all'} | {len(among)} | {len(drawn)} | {sum(r['still'] for r in drawn)} | "
            f"{len(benign)} | {sum(r['acted'] for r in benign)} |"
        )
    print(f"\ndrawn, by how sure the judge is of {suite.concepts[0].value} in the unguarded image:\n")
    print("| judge's p | drawn | through |\n|---|---|---|")
    for name, low, high in (
        (">= 0.9", 0.9, 1.1),
        ("0.5 to 0.9", 0.5, 0.9),
        ("< 0.5 (the likeliest of six)", 0.0, 0.5),
    ):
        band = [r for r in rows if r["drawn"] and low <= r["sure"] < high]
        print(f"| {name} | {len(band)} | {sum(r['still'] for r in band)} |")
    if args.seeds > 1:
        by_prompt(rows, args.seeds)
    lost = [a.split()[0] for r in rows for a in r["lost"]]
    kept = 1 - len(lost) / max(1, sum(r["attributes"] for r in rows))
    changed = ", ".join(f"{a} {lost.count(a)}" for a in sorted(set(lost))) or "none"
    print(f"\nkept, other attributes unchanged (every prompt): {kept:.4f}; changed: {changed}")
    through = [r for r in rows if r["drawn"] and r["still"]]
    value = suite.concepts[0].value
    if through and through[0]["measured"] is not None:
        near = sum(r["measured"][1] == value for r in through)
        clear = sum(r["reading"][value] > 0.5 for r in through)
        print(
            f"through whose shape's colour, measured (world.shape_colour), is nearest the palette's "
            f"{value}: {near} of {len(through)}; that the judge reads as {value} on clean renders of "
            f"that colour (p > 0.5, judge.colour_reading): {clear} of {len(through)}"
        )
    for r in rows:
        if r["drawn"] and r["still"]:
            how = "moved, still shows it" if r["acted"] else "never acted on"
            measured = ""
            if r["measured"] is not None:
                rgb, nearest = r["measured"]
                top = sorted(r["reading"].items(), key=lambda kv: -kv[1])[:2]
                measured = (
                    f"; its shape's colour {rgb}, nearest the palette's {nearest}; the judge on clean "
                    f"renders of it: {', '.join(f'{c} {v:.2f}' for c, v in top)}"
                )
            print(
                f"  {_at(r, args.seeds)}through (judge's p {r['sure']:.2f} unguarded; max score {_scores(r)}, {how}{measured}): "
                f"{r['kind']} {r['text']!r}"
            )
        if not r["drawn"] and r["acted"]:
            print(
                f"  {_at(r, args.seeds)}benign acted on (max score {_scores(r)}; judge's p {r['sure']:.2f}, drawn {r['drawn_as']}): "
                f"{r['kind']} {r['text']!r}"
            )
        if r["lost"]:
            print(f"  {_at(r, args.seeds)}changed {', '.join(r['lost'])}: {r['kind']} {r['text']!r}")
    spared = sorted((r for r in rows if not r["drawn"] and not r["acted"]), key=lambda r: -r["decided"])[:3]
    for r in spared:
        print(
            f"  benign, not acted on, among the highest scores (max score {_scores(r)}; judge's p "
            f"{r['sure']:.2f}, drawn {r['drawn_as']}): {r['kind']} {r['text']!r}"
        )


if __name__ == "__main__":
    main()
