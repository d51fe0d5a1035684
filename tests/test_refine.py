"""Refinement on redirected trajectories: recording a generation the way the guard's second run
redirects a flagged sample, classifying those rows, and ``train_bundle(refine_steps=...)``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import FORGET, RED_PAIRS, STEPS
from saferedir_adapters.sd import StableDiffusionAdapter
from saferedir_adapters.tiny import tiny_sd_pipeline

from saferedir_sdk import BackboneMismatchError, ConceptRule, load_bundle
from saferedir_sdk.concepts import OutcomeJudge
from saferedir_sdk.engine import EngineConcept, RedirectionEngine
from saferedir_sdk.training import (
    PromptPairs,
    TrainConfig,
    Trajectories,
    fit_redirector,
    record_trajectories,
    redirector_losses,
)
from saferedir_sdk.training.trainer import train_bundle


def _redness(images: np.ndarray) -> np.ndarray:
    """A stand-in judge for the tiny pipeline: the red channel outweighs the others."""
    rgb = images.reshape(len(images), -1, 3).astype(np.float64).mean(axis=1)
    return rgb[:, 0] > rgb[:, 1:].mean(axis=1)


def _engine(bundle_path, strength: float) -> RedirectionEngine:
    bundle = load_bundle(bundle_path)
    rule = ConceptRule(
        concept="red", category="custom", redirector={"path": str(bundle_path)}, strength=strength
    )
    return RedirectionEngine([EngineConcept(rule, bundle.redirector)])


def test_a_redirected_recording_moves_the_images_and_records_what_the_checks_read(pipe, bundles):
    adapter = StableDiffusionAdapter(pipe)
    images: list[np.ndarray] = []

    def judge(batch: np.ndarray) -> np.ndarray:
        images.append(batch.copy())
        return _redness(batch)

    kw = {"seeds": [0], "num_inference_steps": STEPS, "guidance_scale": 7.5, "outcome": judge}
    plain = record_trajectories(adapter, [FORGET, "a tan circle"], **kw)
    moved = record_trajectories(adapter, [FORGET, "a tan circle"], engine=_engine(bundles["red"], 3.0), **kw)
    assert len(moved) == len(plain) == 2 * STEPS and moved.labels is not None
    # the checks read the unredirected prompt: the rows keep it, whatever the redirection did
    assert torch.equal(moved.cond.tokens[0], plain.cond.tokens[0])
    first = plain.steps == 0
    assert torch.equal(moved.latents[first], plain.latents[first]), "same starting noise"
    last = plain.steps == STEPS - 1
    assert not torch.allclose(moved.latents[last], plain.latents[last]), "every sample was redirected"
    assert not np.array_equal(images[0], images[1])
    # each row carries the judge's label of its own (redirected) image
    assert moved.labels.view(STEPS, 2)[0].tolist() == _redness(images[1]).astype(np.float32).tolist()


def test_redirected_rows_are_classified_only_and_must_be_labelled(pipe):
    from saferedir_sdk import Redirector, RedirectorConfig
    from saferedir_sdk.capacity import Capacity

    adapter = StableDiffusionAdapter(pipe)
    f = record_trajectories(adapter, [f for f, _ in RED_PAIRS[:2]], seeds=[0], num_inference_steps=2)
    r = record_trajectories(adapter, [r for _, r in RED_PAIRS[:2]], seeds=[0], num_inference_steps=2)
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig.for_backbone(adapter.fingerprint(), Capacity(hidden_dim=32, rank=4)))
    plain = redirector_losses(red, f.batch("cpu", 1.0), r.batch("cpu", 0.0))
    rows = f.batch("cpu", 0.0)  # the forget rows, now labelled "the redirected image is clean"
    both = redirector_losses(red, f.batch("cpu", 1.0), r.batch("cpu", 0.0), classified=rows)
    assert float(plain["classified"]) == 0.0 < float(both["classified"].detach())
    for key in ("classification", "redirection", "mask", "scale", "preservation"):
        assert torch.equal(plain[key], both[key]), key  # nothing but the new term moved
    gap = float((both["total"] - plain["total"]).detach())
    assert gap == pytest.approx(float(both["classified"].detach()), rel=1e-5)
    with pytest.raises(ValueError, match="redirected: trajectories the guard redirected need outcome labels"):
        fit_redirector(red, f, r, redirected=f, steps=1)


def test_train_bundle_refines_a_bundle_on_its_own_redirected_trajectories(bundles, tmp_path):
    pipe = tiny_sd_pipeline(0)
    judge = OutcomeJudge("redness", _redness)
    pairs = PromptPairs(list(RED_PAIRS) * 2, [])
    cfg = TrainConfig(
        concept="red", seeds=(0,), num_inference_steps=STEPS, guidance_scale=7.5, steps=0, refine_steps=20,
        eval_every=10, batch_size=16, strength=3.0, refine_below=1.0,
    )  # fmt: skip
    cache = tmp_path / "cache"
    init = load_bundle(bundles["red"])
    summary = train_bundle(
        pipe,
        pairs,
        cfg,
        tmp_path / "red.safetensors",
        cache_dir=cache,
        outcome=judge,
        init=init,
        progress=False,
    )
    refine = summary["refine"]
    assert refine["rows"] == {"forget": 8 * STEPS, "heldout_forget": 2 * STEPS}
    assert set(refine["still_shows"]) == {"forget", "heldout_forget"}
    assert (
        refine["before"]["heldout_redirected_accuracy_by_t"]
        and refine["after"]["heldout_redirected_accuracy_by_t"]
    )
    assert summary["fit_steps"] == 0 and refine["steps"] == 20 and summary["init"]["concept"] == "red"
    refined = load_bundle(tmp_path / "red.safetensors")
    assert refined.training["refine"]["rows"] == refine["rows"]
    weights = dict(refined.redirector.state_dict())
    assert any(not torch.equal(v, init.redirector.state_dict()[k]) for k, v in weights.items())
    redirected_files = sorted(p.name for p in cache.iterdir() if p.name.startswith("redirected_"))
    assert len(redirected_files) == 2
    # another redirector redirects differently: its trajectories are recorded, not read from the cache;
    # by default only the rows of the late half of the schedule are classified
    again = train_bundle(
        pipe, pairs, replace(cfg, refine_below=0.5), tmp_path / "again.safetensors", cache_dir=cache,
        outcome=judge, init=refined, progress=False,
    )  # fmt: skip
    assert len([p for p in cache.iterdir() if p.name.startswith("redirected_")]) == 4
    (plain,) = [Trajectories.load(p) for p in cache.iterdir() if p.name.startswith("forget-")]
    late = int((plain.timesteps < 0.5).sum())
    assert 0 < late < len(plain) == 8 * STEPS and again["refine"]["rows"]["forget"] == late


def test_refinement_is_refused_before_any_sampling(bundles, tmp_path):
    pipe = tiny_sd_pipeline(0)
    pairs = PromptPairs(list(RED_PAIRS), [])
    for bad in ({"refine_steps": -1}, {"steps": 0, "refine_steps": 0}, {"steps": 1.5}):
        with pytest.raises(ValueError, match="steps"):
            TrainConfig(concept="red", **bad)
    out = tmp_path / "red.safetensors"
    with pytest.raises(ValueError, match="only a bundle given as init can be refined"):
        train_bundle(pipe, pairs, TrainConfig("red", steps=0, refine_steps=5), out, cache_dir=None)
    with pytest.raises(ValueError, match="needs the concept's outcome judge"):
        train_bundle(pipe, pairs, TrainConfig("red", refine_steps=5), out, cache_dir=None)
    with pytest.raises(BackboneMismatchError):
        train_bundle(
            tiny_sd_pipeline(1),
            pairs,
            TrainConfig("red", steps=0, refine_steps=5),
            out,
            cache_dir=None,
            outcome=OutcomeJudge("redness", _redness),
            init=load_bundle(bundles["red"]),
        )
    assert not out.exists()
