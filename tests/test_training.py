"""Fitting a redirector on the tiny pipeline's own trajectories, and the demo that uses it."""

from __future__ import annotations

import json

import torch
from conftest import POOL, RED_PAIRS, STEPS

from saferedir_sdk import Redirector, RedirectorConfig
from saferedir_sdk.training import fit_redirector, record_trajectories


def test_trajectories_line_up_and_fit_lowers_every_loss(pipe):
    forget = record_trajectories(pipe, [f for f, _ in RED_PAIRS], seeds=[0, 1], num_inference_steps=STEPS)
    retain = record_trajectories(pipe, [r for _, r in RED_PAIRS], seeds=[0, 1], num_inference_steps=STEPS)
    pool = record_trajectories(pipe, POOL[1:], seeds=[0], num_inference_steps=STEPS)
    n = len(RED_PAIRS) * 2 * STEPS
    assert len(forget) == len(retain) == n
    assert forget.embeds.shape == (n, 77, 32) and forget.latents.shape == (n, 4, 32, 32)
    assert torch.equal(forget.steps, retain.steps) and torch.equal(forget.timesteps, retain.timesteps)
    assert torch.equal(forget.latents[0], retain.latents[0]), "paired rows share the seed's first latent"
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig(32, 77, 4, hidden_dim=64, rank=8, latent_pool=8))
    result = fit_redirector(red, forget, retain, negatives=pool, steps=120, batch_size=32, log_every=119)
    first, last = result.history[0], result.history[-1]
    for key in ("classification", "redirection", "mask", "scale", "total"):
        assert last[key] < first[key], key
    assert last["accuracy"] == 1.0 and last["masked_cosine"] > first["masked_cosine"]
    assert not red.training and not any(p.requires_grad for p in red.parameters())


def test_demo_runs_end_to_end(tmp_path, capsys):
    from saferedir_sdk.cli import main

    assert main(["demo-mechanics", "--out", str(tmp_path / "demo"), "--steps", "4"]) == 0
    out = capsys.readouterr().out
    assert "a red circle     redirected" in out and "a blue star      blocked" in out
    records = [json.loads(x) for x in (tmp_path / "demo" / "audit.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["outcome"] == "blocked"
    assert (tmp_path / "demo" / "grid.png").stat().st_size > 0
