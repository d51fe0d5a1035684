"""What a rule would decide from its deciding checks alone, and what it reads there: the words or
the latent. Per concept of the efficacy suite's split, every prompt is generated unguarded (the
eval's seeds) and every denoising step recorded; each concept's bundle scores every step twice,
with the real prompt and with the empty one (the latent alone). Each image is labelled by the
judge: the forget-type sets' images that show the concept ("drawn") and the retain images that do
not ("benign").

    python benchmarks/deciding_checks.py                          # dev split, the shipped Shapes bundles
    python benchmarks/deciding_checks.py --bundle star=CANDIDATE.safetensors --concepts star
    python benchmarks/deciding_checks.py --concepts striped --n 192   # 4x the dev prompts
    python benchmarks/deciding_checks.py --concepts red --prompts benchmarks/prompts/red_dev_descriptions.tsv

For every ``decide_at_t`` x threshold x ``confirm_checks`` (the grids: ``--decide-at``,
``--thresholds``, ``--confirms``) it prints how many drawn images a
``rewind`` rule would never flag (no ``confirm_checks`` hits in a row among the checks at a noise
level <= ``decide_at_t``, every ``replace_steps + 1`` steps) and how many benign ones it would flag,
reading the real prompt and reading the empty prompt. With ``rewind`` these counts are the rule's
own decisions (the first run is the unguarded trajectory); whether a flagged image then erases
needs a guarded run (``benchmarks/decision_sweep.py``). What ``decision_sweep``'s threshold table
cannot say (it takes each image's peak over every check), this one does. ``--out FILE`` writes the
per-step scores as JSON; ``--mean-of FILE FILE ...`` reads several such files (bundles of one
concept scored on the same prompts, e.g. classifier fits of different seeds or recipes) and prints
the table for the mean of their p(unsafe) at every step: what an ensemble of those classifiers
would decide. Loads no model. ``--prompts FILE`` scores one concept on a wordings file
(``kind<TAB>text`` a line, as ``guarded_wordings.py`` reads it) instead of the split: its prompts
the backbone drew as the concept are the drawn ones, the others benign.

    python benchmarks/deciding_checks.py --concepts striped --n 192 --bundle striped=A.safetensors --out a.json
    python benchmarks/deciding_checks.py --mean-of a.json b.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from shapes_suite import suite_bundles_adapter, with_wordings

DECIDE_AT = (1.0, 0.5, 0.4, 0.35, 0.3)
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CONFIRMS = (1, 2, 3)
#: the set name of a wordings file's prompts (``--prompts``): drawn or benign by what the image shows
WORDINGS_SET = "wordings"


@torch.no_grad()
def scores(suite: Any, adapter: Any, bundles: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    """Per concept, one entry per prompt: its set, text, whether the unguarded image shows the
    concept, and per step the normalised timestep and p(unsafe) with the real and the empty prompt."""
    from saferedir_bench.evaluation import SETS, Runner

    from saferedir_sdk.bundle import load_bundle
    from saferedir_sdk.training.trajectories import record_trajectories

    empty = adapter.encode_prompts([""])[0].map(lambda x: x.float())
    defaults = Runner(adapter, suite)  # the eval's batches and seeds
    size, seed0 = defaults.batch_size, defaults.seed
    out: dict[str, list[dict[str, Any]]] = {}
    for concept in suite.concepts:
        redirector = load_bundle(bundles[concept.name]).redirector.eval()

        def shows(images: np.ndarray, concept: Any = concept) -> np.ndarray:
            return np.array([v == concept.value for v in suite.judge(images)[concept.attribute]])

        for k, set_name in enumerate(SETS):
            texts = [p.text for p in concept.sets[set_name]]
            for i in range(0, len(texts), size):
                batch = texts[i : i + size]
                rows = record_trajectories(
                    adapter,
                    batch,
                    seeds=(seed0 + 1000 * k + i,),  # the eval's seed for this batch
                    num_inference_steps=suite.num_inference_steps,
                    guidance_scale=suite.guidance_scale,
                    outcome=shows,
                )
                latents, t, cond = rows.inputs("cpu")
                real = torch.sigmoid(redirector(latents, t, cond).logit).numpy()
                n = len(rows)
                blank = empty.map(lambda x, n=n: x.expand(n, *x.shape[1:]))
                latent_only = torch.sigmoid(redirector(latents, t, blank).logit).numpy()
                for j, text in enumerate(batch):
                    mine = (rows.prompt_ids == j).numpy()
                    order = np.argsort(rows.steps.numpy()[mine])
                    out.setdefault(concept.name, []).append(
                        {
                            "set": set_name,
                            "text": text,
                            "shows": bool(rows.labels[mine][0]),  # type: ignore[index]
                            "t": rows.timesteps.numpy()[mine][order].round(4).tolist(),
                            "real": real[mine][order].round(4).tolist(),
                            "empty": latent_only[mine][order].round(4).tolist(),
                        }
                    )
            print(f"{concept.name} {set_name}: done", flush=True)
    return out


def flagged(
    p: list[float], t: list[float], threshold: float, decide_at_t: float, confirm: int, every: int
) -> bool:
    """A ``rewind`` rule's first run on this trajectory: ``confirm`` hits in a row among the checks
    (every ``every`` steps from step 0) at a noise level <= ``decide_at_t``."""
    run = 0
    for step in range(0, len(p), every):
        if t[step] > decide_at_t:
            continue
        run = run + 1 if p[step] >= threshold else 0
        if run >= confirm:
            return True
    return False


def counts(
    entries: list[dict[str, Any]],
    every: int,
    reading: str,
    decide_at: tuple[float, ...] = DECIDE_AT,
    thresholds: tuple[float, ...] = THRESHOLDS,
    confirms: tuple[int, ...] = CONFIRMS,
) -> dict[tuple[float, float, int], tuple[int, int]]:
    """Per rule of the grid (``decide_at_t``, threshold, ``confirm_checks``): the drawn images it
    never flags and the benign images it flags, reading ``reading`` ("real" or "empty")."""
    drawn, benign = _drawn(entries), _benign(entries)
    return {
        (d, th, c): (
            sum(not flagged(e[reading], e["t"], th, d, c, every) for e in drawn),
            sum(flagged(e[reading], e["t"], th, d, c, every) for e in benign),
        )
        for d, th, c in itertools.product(decide_at, thresholds, confirms)
    }


def _drawn(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The forget-type prompts the unguarded model drew as the concept."""
    return [e for e in entries if e["set"] != "retain" and e["shows"]]


def _benign(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The retain prompts it did not (a wordings file's: every prompt it did not)."""
    return [e for e in entries if e["set"] in ("retain", WORDINGS_SET) and not e["shows"]]


def table(
    entries: list[dict[str, Any]],
    every: int,
    grid: tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]] = (DECIDE_AT, THRESHOLDS, CONFIRMS),
) -> list[str]:
    drawn, benign = len(_drawn(entries)), len(_benign(entries))
    lines = [
        f"drawn {drawn}, benign {benign}; cells: drawn never flagged / benign flagged",
        "",
        "| decide_at_t | threshold | confirm_checks | real prompt | empty prompt (latent alone) |",
        "|---|---|---|---|---|",
    ]
    real, empty = counts(entries, every, "real", *grid), counts(entries, every, "empty", *grid)
    for (d, th, c), (miss, hits) in real.items():
        lines.append(f"| {d} | {th} | {c} | {miss}/{hits} | {empty[(d, th, c)][0]}/{empty[(d, th, c)][1]} |")
    return [*lines, "", frontier(entries, every, grid)]


def frontier(
    entries: list[dict[str, Any]],
    every: int,
    grid: tuple[tuple[float, ...], tuple[float, ...], tuple[int, ...]] = (DECIDE_AT, THRESHOLDS, CONFIRMS),
    benign_at_most: tuple[int, ...] = (3, 2, 1, 0),
) -> str:
    """One line: per bound on the benign images flagged, the fewest drawn images never flagged by a
    rule of the grid that decides late (``decide_at_t`` <= 0.5) reading the real prompt, and the
    rule."""
    decide_at, thresholds, confirms = grid
    cells = counts(entries, every, "real", tuple(d for d in decide_at if d <= 0.5), thresholds, confirms)
    parts = []
    for bound in benign_at_most:
        fits = [(m, h, k) for k, (m, h) in cells.items() if h <= bound]
        if fits:
            m, h, (d, th, c) = min(fits)
            parts.append(
                f"benign <= {bound}: {m} never flagged ({h} benign; t {d}, threshold {th}, {c} in a row)"
            )
        else:
            parts.append(f"benign <= {bound}: no rule")
    return "fewest drawn never flagged, " + "; ".join(parts)


def mean_of(files: list[Path]) -> dict[str, list[dict[str, Any]]]:
    """The per-step scores of several ``--out`` files averaged: the same concepts, prompts, labels
    and steps in each, else a clear error naming the file."""
    results = [json.loads(f.read_text()) for f in files]
    out: dict[str, list[dict[str, Any]]] = {}
    for concept, first in results[0].items():
        for f, other in zip(files[1:], results[1:]):
            theirs = other.get(concept)
            same = theirs is not None and len(theirs) == len(first)
            same = same and all(
                (a["set"], a["text"], a["shows"], a["t"]) == (b["set"], b["text"], b["shows"], b["t"])
                for a, b in zip(first, theirs)
            )
            if not same:
                raise SystemExit(
                    f"--mean-of: {f} does not score {concept!r} on the prompts, labels and steps of {files[0]}"
                )
        rows = [r[concept] for r in results]
        out[concept] = [
            {
                **entry,
                **{k: np.mean([r[i][k] for r in rows], axis=0).round(4).tolist() for k in ("real", "empty")},
            }
            for i, entry in enumerate(first)
        ]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", nargs="*", default=[], help="CONCEPT=PATH: score this bundle instead")
    parser.add_argument("--concepts", nargs="+", default=None)
    parser.add_argument("--split", default="dev", choices=("dev", "eval", "fresh", "fresh2"))
    parser.add_argument("--replace-steps", type=int, default=1, help="checks every replace_steps + 1 steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--prompts", type=Path, default=None, help="kind<TAB>text a line: one concept's wordings"
    )
    parser.add_argument("--decide-at", nargs="+", type=float, default=list(DECIDE_AT))
    parser.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS))
    parser.add_argument("--confirms", nargs="+", type=int, default=list(CONFIRMS))
    parser.add_argument(
        "--n", type=int, default=0, help="prompts per set (0: the suite's; more: its next draws)"
    )
    parser.add_argument(
        "--mean-of",
        nargs="+",
        type=Path,
        default=None,
        help="--out files of one concept's bundles on the same prompts: the table of their mean scores",
    )
    args = parser.parse_args()
    every = args.replace_steps + 1
    grid = (tuple(args.decide_at), tuple(args.thresholds), tuple(args.confirms))
    if args.mean_of:
        n = len(args.mean_of)
        whose = f"the mean of {n} classifiers' scores" if n > 1 else "one classifier's scores"
        for concept, entries in mean_of(args.mean_of).items():
            print(f"\n{concept} ({whose}, a check every {every} steps):")
            print("\n".join(table(entries, every, grid)))
        return
    torch.set_num_threads(args.threads)

    suite, bundles, adapter = suite_bundles_adapter(args.split, args.concepts, args.bundle, args.n)
    source = f"{args.split} split"
    if args.prompts is not None:
        if len(suite.concepts) != 1:
            raise SystemExit("--prompts: name the one concept its wordings are for (--concepts NAME)")
        suite = with_wordings(suite, args.prompts)
        source = str(args.prompts)
    result = scores(suite, adapter, bundles)
    if args.prompts is not None:  # drawn or benign by what each image shows
        result = {c: [{**e, "set": WORDINGS_SET} for e in entries] for c, entries in result.items()}
    if args.out is not None:
        args.out.write_text(json.dumps(result))
    for concept, entries in result.items():
        print(f"\n{concept} ({source}, {bundles[concept]}, a check every {every} steps): ")
        print("\n".join(table(entries, every, grid)))


if __name__ == "__main__":
    main()
