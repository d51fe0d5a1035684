"""How often do the real-world packs' Shapes bundles fire, on prompts nobody tuned them on?

    python benchmarks/pack_detection.py [--out bench-out/packs] [--zeros 300]

For each pack (``nudity``, ``vangogh``, ``weapons``, installed: ``make demo``), a guard built from
the policy ``PACK:default`` with the rule switched to ``monitor`` runs the Shapes pipeline on:

* the pack's own ``held_out`` prompts (wordings, subjects and templates training never saw):
  detection on the forget side, false triggers on the retain side;
* independent sets read by path from ``../shared/data`` (never trained on): nudity -- I2P prompts
  with ``nudity_percentage >= 50`` (detection) and a seeded sample of ``== 0`` (false trigger), the
  IGMU Nudity forget / retain prompts; vangogh -- the IGMU VanGogh forget / retain prompts;
  weapons -- I2P prompts that name a firearm or blade (detection: named, not necessarily drawn)
  and the I2P ``== 0`` sample (false trigger); every pack -- the other packs' held-out forget
  prompts (false trigger: another concept is not this one).

The Shapes backbone draws shapes, so what is measured is the classifier on the prompt's language
(as ``i2p_detection.py`` does); on a real backbone the latent adds what the image is becoming.
Writes ``packs.json`` and ``packs.md`` (the table in the packs' READMEs).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PACKS = ("nudity", "vangogh", "weapons")
WEAPON_WORDS = re.compile(
    r"\b(gun|guns|pistol|rifle|shotgun|revolver|handgun|firearm|sword|knife|dagger|ak-?47)\b", re.I
)


def _i2p(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _igmu(name: str, concept: str) -> list[str]:
    data = json.loads((DATA / name).read_text())[concept]
    return [p for prompts in data.values() for p in prompts] if isinstance(data, dict) else list(data)


def _sets(pack: str, held_out: dict[str, dict[str, list[str]]], rows: list[dict[str, str]], zeros: list[str]):
    """{set name: (prompts, 'detection' | 'false trigger')} for ``pack``."""
    sets = {
        "held-out forget": (held_out[pack]["forget"], "detection"),
        "held-out retain": (held_out[pack]["retain"], "false trigger"),
        "other packs' held-out forget": (
            [p for other in PACKS if other != pack for p in held_out[other]["forget"]],
            "false trigger",
        ),
    }
    if pack == "nudity":
        sets["I2P nudity >= 50"] = (
            [r["prompt"] for r in rows if float(r["nudity_percentage"] or 0) >= 50],
            "detection",
        )
        sets["I2P nudity == 0 (sample)"] = (zeros, "false trigger")
        sets["IGMU Nudity forget"] = (_igmu("igmu_forget.json", "Nudity"), "detection")
        sets["IGMU Nudity retain"] = (_igmu("igmu_retain.json", "Nudity"), "false trigger")
    elif pack == "vangogh":
        sets["IGMU VanGogh forget"] = (_igmu("igmu_forget.json", "VanGogh"), "detection")
        sets["IGMU VanGogh retain"] = (_igmu("igmu_retain.json", "VanGogh"), "false trigger")
    else:
        sets["I2P naming a weapon"] = (
            [r["prompt"] for r in rows if WEAPON_WORDS.search(r["prompt"])],
            "detection",
        )
        sets["I2P nudity == 0 (sample)"] = ([z for z in zeros if not WEAPON_WORDS.search(z)], "false trigger")
    return sets


def _nudity_baselines(pipe, sets) -> dict[str, dict[str, float]]:
    """On the nudity sets: the pack's guard (its rates again, for the side-by-side table), the
    I2P benchmark's keyword blocklist, and the cosine of the prompt's MiniLM sentence embedding to
    the concept's (threshold: the best balanced accuracy on the pack's own training pairs)."""
    from i2p_detection import NUDITY_WORDS, embedding_cosine
    from saferedir_bench.baselines import KeywordBlocklist
    from saferedir_nudity.plugin import recipe

    blocklist = KeywordBlocklist(NUDITY_WORDS)
    flagged, _ = embedding_cosine(pipe, recipe()[0])
    return {
        "keyword blocklist": {
            k: float(np.mean([blocklist.blocks(p) for p in v[0]])) for k, v in sets.items()
        },
        "embedding cosine": {k: float(np.mean(flagged(v[0]))) for k, v in sets.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/packs"))
    parser.add_argument("--zeros", type=int, default=300, help="I2P prompts with nudity 0 to sample")
    args = parser.parse_args(argv)
    from importlib import import_module

    from saferedir_shapes.pipeline import load_shapes_pipeline

    from saferedir_sdk import SafeRedirGuard
    from saferedir_sdk.bundle import file_sha256
    from saferedir_sdk.plugins import resolve_policy_ref
    from saferedir_sdk.policy import load_policy

    torch.set_num_threads(2)
    if not (DATA / "i2p.csv").is_file():
        print(f"{DATA}: the shared data folder (i2p.csv, igmu_*.json) is not there", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = _i2p(DATA / "i2p.csv")
    zeros = random.Random(0).sample(
        [r["prompt"] for r in rows if float(r["nudity_percentage"] or 0) == 0], args.zeros
    )
    held_out = {p: import_module(f"saferedir_{p}.plugin").recipe_data()["held_out"] for p in PACKS}
    pipe = load_shapes_pipeline()
    results: dict[str, dict] = {}
    for pack in PACKS:
        loaded = load_policy(resolve_policy_ref(None, f"{pack}:default"))
        rule = loaded.policy.concepts[0].model_copy(update={"action": "monitor"})
        policy = loaded.policy.model_copy(
            update={"concepts": [rule], "audit": loaded.policy.audit.model_copy(update={"sinks": []})}
        )
        guard = SafeRedirGuard(loaded.model_copy(update={"policy": policy}))
        guard.wrap(pipe)
        bundles = import_module(f"saferedir_{pack}.plugin").bundles()
        results[pack] = {"bundle": ", ".join(f"{b.name} {file_sha256(b)[:12]}" for b in bundles)}
        for name, (prompts, kind) in _sets(pack, held_out, rows, zeros).items():
            hits = []
            for i in range(0, len(prompts), 16):
                pipe(prompts[i : i + 16], generator=torch.Generator().manual_seed(i), output_type="np")
                hits += [s.action != "none" for s in guard.last_report.samples]
            results[pack][name] = {"n": len(prompts), kind: round(float(np.mean(hits)), 3)}
            print(pack, name, results[pack][name], flush=True)
        guard.unwrap(pipe)
    baselines = _nudity_baselines(pipe, _sets("nudity", held_out, rows, zeros))
    ours = {
        k: v.get("detection", v.get("false trigger")) for k, v in results["nudity"].items() if k != "bundle"
    }
    results["nudity baselines"] = {"saferedir (nudity pack)": ours, **baselines}
    lines = ["| pack | set | prompts | detection | false trigger |", "|---|---|---|---|---|"]
    for pack, sets in results.items():
        if pack == "nudity baselines":
            continue
        for name, r in sets.items():
            if name != "bundle":
                lines.append(
                    f"| {pack} | {name} | {r['n']} | {r.get('detection', '-')} | {r.get('false trigger', '-')} |"
                )
    base = results["nudity baselines"]
    columns = list(base["saferedir (nudity pack)"])
    lines += [
        "",
        "Nudity, share of prompts flagged (detection on the forget sets, false trigger on the others):",
        "",
        "| method | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method, by_set in base.items():
        lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in by_set.values()) + " |")
    table = "\n".join(lines) + "\n"
    results["seconds_total"] = round(time.perf_counter() - start, 1)  # type: ignore[assignment]
    (args.out / "packs.json").write_text(json.dumps(results, indent=2))
    (args.out / "packs.md").write_text(table)
    print(table)
    print(f"{results['seconds_total']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
