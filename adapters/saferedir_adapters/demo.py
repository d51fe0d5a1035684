"""``saferedir demo-mechanics``: policy -> guard -> redirection -> audit, end to end, offline, in
well under a minute.

It runs on a tiny Stable Diffusion 1.x pipeline (the real ``StableDiffusionPipeline`` class) with
random weights built from configs (see :mod:`saferedir_adapters.tiny`): its images are noise by
construction, so the demo shows the mechanics, not erasure quality. It fits two real redirectors on
the spot from paired prompt trajectories (``red`` -> redirect, ``star`` -> block), writes them as
bundles with a policy that pins their sha256, wraps the pipeline and generates a batch unguarded
and guarded with the same seed. The grid shows per prompt the unguarded image, the guarded one and
their difference (amplified; black where nothing changed). The efficacy demo on a trained
backbone is the Shapes world's (``saferedir demo``).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from saferedir_sdk import ConceptInfo, SafeRedirGuard, hookimpl, save_bundle

from .sd import StableDiffusionAdapter

DEMO_PROMPTS = ["a red circle", "a tan circle", "a blue star", "a blue moon"]
STEPS = 6

POLICY = """\
# written by `saferedir demo-mechanics`: two concepts fitted on a tiny random-weights pipeline
version: 1
name: demo-mechanics
fail_mode: closed
audit:
  sinks: [file]
  file: {audit}
  prompt_logging: sha256
defaults:
  threshold: 0.5
  strength: {strength}
  replace_steps: 0
block:
  mode: placeholder
  color: [0, 0, 0]
concepts:
  - concept: red
    category: custom
    redirector: {{path: red.safetensors, sha256: {red_sha}}}
    action: redirect
  - concept: star
    category: custom
    redirector: {{path: star.safetensors, sha256: {star_sha}}}
    action: block
"""


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def run_demo(out: Path, *, strength: float = 2.0) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    from .tiny import PAIRS, fit_tiny_redirector, tiny_sd_pipeline

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out.mkdir(parents=True, exist_ok=True)
    audit = out / "audit.jsonl"  # appended to: earlier runs' records stay (and its hash chain goes on)
    start = time.perf_counter()
    print(
        "saferedir demo-mechanics: tiny random-weights StableDiffusionPipeline (its images are noise by "
        "construction: mechanics only)"
    )
    pipe = tiny_sd_pipeline(seed=0)
    fp = StableDiffusionAdapter(pipe).fingerprint()
    shas = {}
    for concept, pairs in PAIRS.items():
        t0 = time.perf_counter()
        redirector = fit_tiny_redirector(pipe, pairs, num_inference_steps=STEPS, seeds=(0,))
        shas[concept] = save_bundle(
            out / f"{concept}.safetensors",
            redirector,
            ConceptInfo(concept, "custom"),
            fp,
            {"fitted_by": "saferedir demo-mechanics", "pairs": len(pairs)},
        )
        print(
            f"  fitted redirector '{concept}' on {len(pairs)} prompt pairs' trajectories in {time.perf_counter() - t0:.1f} s"
        )
    policy_path = out / "policy.yaml"
    policy_path.write_text(
        POLICY.format(
            audit=json.dumps(str(audit.resolve())),
            strength=strength,
            red_sha=shas["red"],
            star_sha=shas["star"],
        )
    )

    def generate() -> np.ndarray:
        return _to_uint8(
            pipe(
                DEMO_PROMPTS,
                num_inference_steps=STEPS,
                generator=torch.Generator().manual_seed(42),
                output_type="np",
            ).images
        )

    unguarded = generate()
    guard = SafeRedirGuard.from_policy(policy_path)
    guard.wrap(pipe)
    guarded = generate()
    report = guard.last_report
    guard.unwrap(pipe)

    diff = np.abs(guarded.astype(np.int16) - unguarded.astype(np.int16))
    # each row's difference stretched to the full range, so a small change is visible (black: none)
    gains = [max(1, 255 // max(1, int(d.max()))) for d in diff]
    print(
        f"\n  {'prompt':<14} {'action':<11} {'p(red)':>7} {'p(star)':>8} {'pixels changed':>15} {'mean |change|':>14}"
    )
    for sample in report.samples:
        i = sample.index
        scores = {c.concept: c.max_score for c in sample.concepts}
        changed = float((diff[i].max(axis=-1) > 0).mean())
        print(
            f"  {DEMO_PROMPTS[i]:<14} {sample.action:<11} {scores['red']:>7.3f} {scores['star']:>8.3f} "
            f"{changed:>15.1%} {diff[i].mean():>14.2f}"
        )
    rows = [
        np.concatenate([a, b, np.clip(d * g, 0, 255).astype(np.uint8)], axis=1)
        for a, b, d, g in zip(unguarded, guarded, diff, gains)
    ]
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (3 * 64 * 3, len(rows) * 64 * 3), Image.NEAREST
    ).save(out / "grid.png")
    records = [line for line in audit.read_text().splitlines() if report.request_id in line]
    print(
        f"\n  outcome: {report.outcome}; audit: {audit} ({len(records)} records of request {report.request_id}: start and generation)"
    )
    print(
        f"  policy: {policy_path}; grid (per prompt: unguarded | guarded | difference, stretched x{gains}): {out / 'grid.png'}"
    )
    print(f"  total {time.perf_counter() - start:.1f} s")
    return 0


@hookimpl
def saferedir_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo-mechanics", help="the guard's mechanics on a tiny random-weights SD 1.x pipeline"
    )
    p.add_argument(
        "--out", default="saferedir-demo-mechanics", help="output folder (default: saferedir-demo-mechanics)"
    )
    p.add_argument(
        "--strength", type=float, default=2.0, help="the policy's redirection strength (default 2.0)"
    )
    p.set_defaults(func=lambda args: run_demo(Path(args.out), strength=args.strength))
