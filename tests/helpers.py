"""Helpers the tests share (imported as ``from helpers import ...``; fixtures live in conftest)."""

from __future__ import annotations

import subprocess
import sys

import torch
from saferedir_adapters.tiny import PAIRS, tiny_sd_pipeline, tiny_sdxl_pipeline

STEPS = 4
RED_PAIRS = PAIRS["red"]
STAR_PAIRS = PAIRS["star"]
FORGET, RETAIN = "a red circle", "a tan circle"  # the two prompts most tests generate
# the smallest valid policy document (its one rule at lines 4-6)
GOOD_POLICY = """\
version: 1
name: t
concepts:
  - concept: nudity
    category: nsfw
    redirector: {plugin: nudity}
"""


FAMILIES = {  # backbone family -> builder of its tiny text-to-image pipeline (seed 0)
    "sd1": lambda **kw: tiny_sd_pipeline(0, **kw),
    "sd2-v": lambda **kw: tiny_sd_pipeline(0, token_dim=48, prediction_type="v_prediction", **kw),
    "sdxl": lambda **kw: tiny_sdxl_pipeline(0, **kw),
    "sdxl-refiner": lambda **kw: tiny_sdxl_pipeline(0, second_encoder_only=True, **kw),
}


def input_image() -> torch.Tensor:
    """A seeded random 64x64 RGB image in [0, 1] (the tiny pipelines' image size): an img2img or
    inpaint input, a control image."""
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(11))


def inpaint_mask() -> torch.Tensor:
    """A 64x64 inpainting mask: the centre square (32x32) repainted."""
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    return mask


class UNetRecorder:
    """Records what the UNet actually receives (a pre-hook registered after the guard's)."""

    def __init__(self, unet):
        self.calls: list[dict] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        call = {"ehs": kwargs["encoder_hidden_states"].detach().clone(), "sample": args[0].detach().clone()}
        pooled = (kwargs.get("added_cond_kwargs") or {}).get("text_embeds")
        if pooled is not None:
            call["pooled"] = pooled.detach().clone()
        self.calls.append(call)

    def remove(self):
        self.handle.remove()


def write_red_pairs(path):
    """A pairs file (JSON lines) of the red pairs twice and the tiny retain pool; returns ``path``."""
    import json

    from saferedir_adapters.tiny import RETAIN_POOL

    lines = [json.dumps({"forget": f, "retain": r}) for f, r in RED_PAIRS * 2]
    path.write_text("\n".join(lines + [json.dumps({"retain": p}) for p in RETAIN_POOL]))
    return path


def generate(pipe, prompts=(FORGET, RETAIN), *, seed=7, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    return pipe(list(prompts), generator=torch.Generator().manual_seed(seed), **kwargs)


# `accelerate launch --cpu --num_processes 2` starts ONE process (huggingface/accelerate#2741); several
# CPU processes on one machine go through the torch.distributed launcher with ACCELERATE_USE_CPU=1.
ACCELERATE_TWO_CPU_PROCESSES = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    *"--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no".split(),
]


def run_ok(cmd: list[str], *, timeout: int = 900, **kwargs) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail the test with the tail of its output unless it exits 0."""
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run
