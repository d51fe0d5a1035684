"""Shared fixtures: tiny random-weights SD 1.x pipelines and redirectors fitted on them.

Nothing is faked: the redirectors are real modules trained (in seconds) on trajectories the
tiny pipeline's own sampler produced, and the guard runs the real engine through the real hook.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

warnings.filterwarnings("ignore", category=FutureWarning)

from saferedir_adapters.sd import StableDiffusionAdapter  # noqa: E402
from saferedir_adapters.tiny import tiny_sd_pipeline  # noqa: E402

from saferedir_sdk import ConceptInfo, Redirector, RedirectorConfig, save_bundle  # noqa: E402
from saferedir_sdk.training import fit_redirector, record_trajectories  # noqa: E402

STEPS = 4
RED_PAIRS = [("a red circle", "a tan circle"), ("a red square", "a tan square"), ("red star", "tan star"),
             ("a big red cross", "a big tan cross"), ("one red dot", "one tan dot")]
STAR_PAIRS = [("a blue star", "a blue moon"), ("star in a box", "moon in a box"), ("a green star", "a green moon"),
              ("big star", "big moon"), ("the star", "the moon")]
FORGET, RETAIN = "a red circle", "a tan circle"  # the two prompts most tests generate
POOL = ["a tan circle", "a blue moon", "a green square", "tan star", "a blue circle", "one dot"]  # unpaired benign


def fit(pipe, pairs, *, seeds=(0, 1), steps=200, seed=0) -> Redirector:
    forget = record_trajectories(pipe, [f for f, _ in pairs], seeds=seeds, num_inference_steps=STEPS)
    retain = record_trajectories(pipe, [r for _, r in pairs], seeds=seeds, num_inference_steps=STEPS)
    pool = record_trajectories(pipe, [p for p in POOL if all(p != f for f, _ in pairs)], seeds=seeds,
                               num_inference_steps=STEPS)
    fp = StableDiffusionAdapter().fingerprint(pipe)
    torch.manual_seed(seed)
    red = Redirector(RedirectorConfig(fp.token_dim, fp.seq_len, fp.latent_channels, hidden_dim=64, rank=8, latent_pool=8))
    fit_redirector(red, forget, retain, negatives=pool, steps=steps, batch_size=32, seed=seed)
    return red


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Two bundles fitted on the tiny pipeline (seed 0): 'red' and 'star'."""
    folder = tmp_path_factory.mktemp("bundles")
    pipe = tiny_sd_pipeline(0)
    fp = StableDiffusionAdapter().fingerprint(pipe)
    paths = {}
    for name, pairs in (("red", RED_PAIRS), ("star", STAR_PAIRS)):
        paths[name] = folder / f"{name}.safetensors"
        save_bundle(paths[name], fit(pipe, pairs), ConceptInfo(name, "custom"), fp, {"test": True})
    return paths


@pytest.fixture
def pipe():
    return tiny_sd_pipeline(0)


@pytest.fixture
def write_policy(tmp_path, bundles):
    """write_policy(concepts=[...], **top) -> path of a policy YAML whose audit goes to tmp_path/audit.jsonl."""

    def _write(concepts=None, **top) -> Path:
        if concepts is None:
            concepts = [{"concept": "red", "category": "custom", "redirector": {"path": str(bundles["red"])}}]
        doc = {"version": 1, "name": "test", "audit": {"sinks": ["file"], "file": str(tmp_path / "audit.jsonl")}}
        doc.update(top)
        doc["concepts"] = concepts
        path = tmp_path / f"policy-{len(list(tmp_path.glob('policy-*.yaml')))}.yaml"
        path.write_text(json.dumps(doc))  # JSON is YAML
        return path

    return _write


@pytest.fixture
def audit_records(tmp_path):
    def _read() -> list[dict]:
        path = tmp_path / "audit.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return _read


class UNetRecorder:
    """Records what the UNet actually receives (a pre-hook registered after the guard's)."""

    def __init__(self, unet):
        self.calls: list[dict] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        self.calls.append({"ehs": kwargs["encoder_hidden_states"].detach().clone(), "sample": args[0].detach().clone()})

    def remove(self):
        self.handle.remove()


def generate(pipe, prompts=(FORGET, RETAIN), *, seed=7, **kwargs):
    kwargs.setdefault("num_inference_steps", STEPS)
    kwargs.setdefault("output_type", "np")
    return pipe(list(prompts), generator=torch.Generator().manual_seed(seed), **kwargs)
