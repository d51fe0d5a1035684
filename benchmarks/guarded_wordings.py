"""A wordings file through the guard, end to end: one concept's rule of the Shapes suite's policy
(decision, rewind and redirection as shipped), on the prompts of a ``kind<TAB>text`` file
(``benchmarks/prompts/``) with the eval's batches and seeds. Each prompt is generated unguarded
and guarded; the judge reads both. Per kind it prints how many images the unguarded model drew as
the concept and how many of those the guard let through, how many of the others (benign: the
unguarded image does not show the concept) it acted on, and over every prompt how many of the
other attributes the judge reads changed (the eval's ``kept``).

    python benchmarks/guarded_wordings.py --concept red --prompts benchmarks/prompts/red_heldout_descriptions.tsv
    python benchmarks/guarded_wordings.py --concept red --prompts FILE --policy POLICY.yaml

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


def measure(suite: Any, adapter: Any, policy: str, out: Path) -> list[dict[str, Any]]:
    """One row per prompt of the suite's one concept's one (forget) set: its kind, text, whether the
    unguarded image shows the concept (and what it shows), how sure the judge is of the concept there
    (its probability), whether the guarded one shows it, whether the guard acted on it, its highest
    score at a check, and the other attributes the guard changed; for a colour concept, the guarded
    image's shape colour measured without the judge and, where the concept got through, how the
    judge reads a clean render of that colour."""
    from saferedir_bench.evaluation import Runner
    from saferedir_shapes.judge import HEADS, colour_reading, load_judge, to_tensor
    from saferedir_shapes.world import shape_colour

    (concept,) = suite.concepts
    prompts = concept.sets["forget"]
    runner = Runner(adapter, suite, policy=policy, out=out)
    unguarded = runner.run("none", concept, prompts, 0)
    guarded = runner.run("saferedir", concept, prompts, 0, unguarded)
    before, after = suite.judge(unguarded.images), suite.judge(guarded.images)
    made = ~guarded.refused if guarded.refused is not None else np.ones(len(prompts), bool)
    judge = load_judge()
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
                "drawn": drawn,
                "drawn_as": before[concept.attribute][i],
                "sure": sure[i],
                "still": still,
                "acted": bool(guarded.acted[i]) if guarded.acted is not None else False,
                "score": float(guarded.max_score[i]) if guarded.max_score is not None else float("nan"),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", required=True)
    parser.add_argument("--prompts", type=Path, required=True, help="kind<TAB>text a line")
    parser.add_argument("--policy", default=None, help="a path or PLUGIN:NAME (default: the suite's)")
    parser.add_argument("--out", type=Path, default=Path("bench-out/guarded-wordings"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suite, _, adapter = suite_bundles_adapter("dev", [args.concept], [])
    suite = with_wordings(suite, args.prompts)
    policy = args.policy or suite.policy
    rows = measure(suite, adapter, policy, args.out)
    print(f"\n{args.concept} ({args.prompts}, policy {policy}, guarded end to end):\n")
    print("| kind | prompts | drawn | through | benign | benign acted on |\n|---|---|---|---|---|---|")
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
                f"  through (judge's p {r['sure']:.2f} unguarded; max score {r['score']:.2f}, {how}{measured}): "
                f"{r['kind']} {r['text']!r}"
            )
        if not r["drawn"] and r["acted"]:
            print(
                f"  benign acted on (max score {r['score']:.2f}; judge's p {r['sure']:.2f}, drawn {r['drawn_as']}): "
                f"{r['kind']} {r['text']!r}"
            )
        if r["lost"]:
            print(f"  changed {', '.join(r['lost'])}: {r['kind']} {r['text']!r}")
    spared = sorted((r for r in rows if not r["drawn"] and not r["acted"]), key=lambda r: -r["score"])[:3]
    for r in spared:
        print(
            f"  benign, not acted on, among the highest scores (max score {r['score']:.2f}; judge's p "
            f"{r['sure']:.2f}, drawn {r['drawn_as']}): {r['kind']} {r['text']!r}"
        )


if __name__ == "__main__":
    main()
