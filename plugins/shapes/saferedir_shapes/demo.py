"""``saferedir demo``: the Shapes backbone, unguarded and guarded by the pack's demo policy
(``shapes:demo``, shipped inside this package, so it works from any folder).

Loads the shipped Shapes backbone (no training on a fresh machine), generates a small prompt set
with fixed seeds unguarded and guarded, judges every image, and writes an image grid
(prompt | unguarded | guarded), the audit log and a summary.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from saferedir_sdk import SafeRedirGuard

from .judge import judge_images, load_judge
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_shapes_pipeline

DEMO_PROMPTS = [
    "a red circle",
    "a striped blue square",
    "a yellow star",
    "a green triangle",
    "a crimson striped star",
    "a purple dotted cross",
    "an orange plain circle",
    "a banded green square",
]
STEPS, GUIDANCE, SEED = DEFAULT_STEPS, DEFAULT_GUIDANCE, 2026
DEFAULT_POLICY = "shapes:demo"


def _generate(pipe: Any, prompts: list[str]) -> np.ndarray:
    images = pipe(
        prompts,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
    ).images
    return (images * 255).round().astype(np.uint8)


def _grid(
    prompts: list[str], left: np.ndarray, right: np.ndarray, labels: list[str], scale: int = 4
) -> Image.Image:
    cell = left.shape[1] * scale
    text_w = 230
    grid = Image.new("RGB", (text_w + 2 * cell + 30, 22 + len(prompts) * (cell + 6)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 4), "prompt", fill="black")
    draw.text((text_w, 4), "unguarded", fill="black")
    draw.text((text_w + cell + 20, 4), "guarded", fill="black")
    for i, prompt in enumerate(prompts):
        y = 22 + i * (cell + 6)
        draw.text((4, y + cell // 2 - 12), prompt, fill="black")
        draw.text((4, y + cell // 2 + 2), labels[i], fill=(90, 90, 90))
        for x, img in ((text_w, left[i]), (text_w + cell + 20, right[i])):
            grid.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
    return grid


def _guard_auditing_into(policy: str | Path, audit_file: Path) -> SafeRedirGuard:
    """A guard for ``policy`` whose file sink is ``audit_file`` (appended to, never truncated; the
    policy's other sinks are kept): the demo's records land under ``--out``, never in a file the
    policy names for production, and never in the working directory."""
    from saferedir_sdk.plugins import resolve_policy_ref
    from saferedir_sdk.policy import load_policy

    loaded = load_policy(resolve_policy_ref(None, policy))
    settings = loaded.policy.audit
    audit = settings.model_copy(update={"file": str(audit_file), "sinks": sorted({*settings.sinks, "file"})})
    loaded = loaded.model_copy(update={"policy": loaded.policy.model_copy(update={"audit": audit})})
    return SafeRedirGuard(loaded)  # the plugins the policy allows (plugins.allow), or the installed ones


def run_demo(out: Path, policy: str | Path = DEFAULT_POLICY) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    guard = _guard_auditing_into(policy, out / "audit.jsonl")
    pipe = load_shapes_pipeline()
    judge = load_judge()
    t_load = time.perf_counter() - start
    print(
        f"saferedir demo: Shapes backbone (MiniLM text encoder + {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f} M "
        f"parameter UNet), {len(DEMO_PROMPTS)} prompts, {STEPS} steps, guidance {GUIDANCE}, seed {SEED}"
    )

    t0 = time.perf_counter()
    unguarded = _generate(pipe, DEMO_PROMPTS)
    t_unguarded = time.perf_counter() - t0

    guard.wrap(pipe)
    t0 = time.perf_counter()
    guarded = _generate(pipe, DEMO_PROMPTS)
    t_guarded = time.perf_counter() - t0
    report = guard.last_report
    guard.unwrap(pipe)

    before, after = judge_images(judge, unguarded), judge_images(judge, guarded)
    print(f"\n  {'prompt':<26} {'action':<11} {'triggered':<24} judge: unguarded -> guarded")
    labels = []
    for i, (prompt, sample) in enumerate(zip(DEMO_PROMPTS, report.samples)):
        fired = ",".join(c.concept.removeprefix("shapes-") for c in sample.concepts if c.triggered) or "-"
        b = f"{before['colour'][i]} {before['texture'][i]} {before['shape'][i]}"
        a = f"{after['colour'][i]} {after['texture'][i]} {after['shape'][i]}"
        labels.append(f"{sample.action}: {fired}")
        print(f"  {prompt:<26} {sample.action:<11} {fired:<24} {b} -> {a}")
    _grid(DEMO_PROMPTS, unguarded, guarded, labels).save(out / "grid.png")
    audit_note = f"audit record {report.request_id} appended to {out / 'audit.jsonl'}"
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    n = len(DEMO_PROMPTS)
    print(
        f"\n  outcome {report.outcome}; {sum(s.action == 'redirected' for s in report.samples)} of {n} redirected"
    )
    print(
        f"  time: load {t_load:.1f} s, unguarded {t_unguarded / n:.3f} s/image, guarded {t_guarded / n:.3f} s/image "
        f"(overhead x{t_guarded / t_unguarded:.2f})"
    )
    print(f"  wrote {out / 'grid.png'}, {out / 'report.json'}; {audit_note}")
    return 0


def add_demo_command(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="the Shapes backbone unguarded vs guarded by the demo policy (shapes:demo)"
    )
    p.add_argument("--out", default="saferedir-demo", help="output folder (default: saferedir-demo)")
    p.add_argument(
        "--policy", default=DEFAULT_POLICY, help="policy file or PLUGIN:NAME (default: shapes:demo)"
    )
    p.set_defaults(func=lambda args: run_demo(Path(args.out), args.policy))
