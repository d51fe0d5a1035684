"""``saferedir demo-mechanics``: policy -> guard -> redirection -> audit, end to end, offline, in seconds.

It runs on a tiny Stable Diffusion 1.x pipeline with random weights built from configs (see
:mod:`saferedir_adapters.tiny`): its images are noise by construction, so the demo shows the
mechanics, not erasure quality. It fits two real redirectors on the spot from paired prompt
trajectories (``red`` -> redirect, ``star`` -> block), writes them as bundles with a policy that
pins their sha256, wraps the pipeline and generates a batch unguarded and guarded with the same
seed. The efficacy demo on a trained backbone is the Shapes world's (see README).
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

from saferedir_sdk import ConceptInfo, Redirector, RedirectorConfig, SafeRedirGuard, hookimpl, save_bundle
from saferedir_sdk.training import fit_redirector, record_trajectories

from .sd import StableDiffusionAdapter
from .tiny import tiny_sd_pipeline

# paired prompts: the concept word swapped for a same-length neighbour (the tiny tokenizer is per character)
PAIRS = {
    "red": [("a red circle", "a tan circle"), ("a red square", "a tan square"), ("red star", "tan star"),
            ("a big red cross", "a big tan cross"), ("one red dot", "one tan dot")],
    "star": [("a blue star", "a blue moon"), ("star in a box", "moon in a box"), ("a green star", "a green moon"),
             ("big star", "big moon"), ("the star", "the moon")],
}
# unpaired benign prompts: what "not the concept" looks like beyond the paired neighbours
RETAIN_POOL = ["a tan circle", "a blue moon", "a green square", "a blue circle", "one dot", "a big cross"]
DEMO_PROMPTS = ["a red circle", "a tan circle", "a blue star", "a blue moon"]

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
  strength: 1.3
  replace_steps: 1
block:
  mode: placeholder
  color: [0, 0, 0]
concepts:
  - concept: red
    category: custom
    redirector: {{path: red.safetensors, sha256: {red_sha}}}
    action: redirect
  - concept: star
    category: object
    redirector: {{path: star.safetensors, sha256: {star_sha}}}
    action: block
"""


def _fit(pipe: Any, concept: str, steps: int) -> tuple[Redirector, dict[str, float]]:
    forget = [f for f, _ in PAIRS[concept]]
    retain = [r for _, r in PAIRS[concept]]
    kwargs = {"num_inference_steps": steps}
    train_f = record_trajectories(pipe, forget, seeds=[0, 1], **kwargs)
    train_r = record_trajectories(pipe, retain, seeds=[0, 1], **kwargs)
    pool = record_trajectories(pipe, [p for p in RETAIN_POOL if p not in forget], seeds=[0, 1], **kwargs)
    held_f = record_trajectories(pipe, forget, seeds=[2], **kwargs)
    held_r = record_trajectories(pipe, retain, seeds=[2], **kwargs)
    fp = StableDiffusionAdapter().fingerprint(pipe)
    torch.manual_seed(0)
    redirector = Redirector(
        RedirectorConfig(fp.token_dim, fp.seq_len, fp.latent_channels, hidden_dim=64, rank=8, latent_pool=8)
    )
    result = fit_redirector(redirector, train_f, train_r, negatives=pool, steps=200, batch_size=32)
    with torch.no_grad():
        hit = (redirector(held_f.latents, held_f.timesteps, held_f.embeds).logit > 0).float().mean()
        ok = (redirector(held_r.latents, held_r.timesteps, held_r.embeds).logit <= 0).float().mean()
    summary = {"fit_seconds": round(result.seconds, 2), "train_pairs": len(train_f),
               "heldout_seed_accuracy": round(float(hit + ok) / 2, 4), **result.final}
    return redirector, summary


def _to_uint8(images: np.ndarray) -> list[np.ndarray]:
    return [(np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in images]


def run_demo(out: Path, *, steps: int = 10) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    out.mkdir(parents=True, exist_ok=True)
    audit = out / "audit.jsonl"
    audit.unlink(missing_ok=True)
    start = time.perf_counter()
    print("saferedir demo-mechanics: tiny random-weights SD 1.x pipeline (images are noise by construction: mechanics only)")
    pipe = tiny_sd_pipeline(seed=0)
    fp = StableDiffusionAdapter().fingerprint(pipe)
    shas = {}
    for concept in PAIRS:
        redirector, summary = _fit(pipe, concept, steps)
        shas[concept] = save_bundle(out / f"{concept}.safetensors", redirector, ConceptInfo(concept, "custom"), fp, summary)
        print(f"  fitted redirector '{concept}' on {summary['train_pairs']} paired trajectory steps in "
              f"{summary['fit_seconds']} s; held-out-seed accuracy {summary['heldout_seed_accuracy']:.2f}")
    policy_path = out / "policy.yaml"
    policy_path.write_text(POLICY.format(audit=json.dumps(str(audit.resolve())), red_sha=shas["red"], star_sha=shas["star"]))

    def generate() -> np.ndarray:
        return pipe(DEMO_PROMPTS, num_inference_steps=steps, generator=torch.Generator().manual_seed(42),
                    output_type="np").images

    unguarded = generate()
    guard = SafeRedirGuard.from_policy(policy_path)
    guard.wrap(pipe)
    guarded = generate()
    report = guard.last_report
    guard.unwrap(pipe)

    print(f"\n  {'prompt':<16} {'action':<11} {'p(red)':>7} {'p(star)':>8} {'max |pixel change|':>19}")
    for sample, before, after in zip(report.samples, unguarded, guarded):
        scores = {c.concept: c.max_score for c in sample.concepts}
        change = float(np.abs(after - before).max())
        print(f"  {DEMO_PROMPTS[sample.index]:<16} {sample.action:<11} {scores['red']:>7.3f} {scores['star']:>8.3f} "
              f"{change:>19.4f}")
    rows = [np.concatenate([a, b], axis=1) for a, b in zip(_to_uint8(unguarded), _to_uint8(guarded))]
    Image.fromarray(np.concatenate(rows, axis=0)).save(out / "grid.png")
    records = audit.read_text().splitlines()
    print(f"\n  outcome: {report.outcome}; audit: {audit} ({len(records)} record, request {report.request_id})")
    print(f"  policy: {policy_path}; grid (unguarded | guarded per row): {out / 'grid.png'}")
    print(f"  total {time.perf_counter() - start:.1f} s")
    return 0


@hookimpl
def saferedir_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("demo-mechanics", help="the guard's mechanics on a tiny random-weights SD 1.x pipeline")
    p.add_argument("--out", default="saferedir-demo-mechanics", help="output folder (default: saferedir-demo-mechanics)")
    p.add_argument("--steps", type=int, default=10, help="denoising steps per image")
    p.set_defaults(func=lambda args: run_demo(Path(args.out), steps=args.steps))
