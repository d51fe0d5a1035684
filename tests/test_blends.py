"""Blends: a forget generation's recorded trajectory mixed step by step with a retain-side one that
started from the same noise, labelled by the outcome judge on the decoded mix, classified only
(``blend_trajectories``, ``TrainConfig.blends``), and the adapters' ``decode_latents``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import FORGET, RED_PAIRS, STEPS
from saferedir_adapters.sd import StableDiffusionAdapter
from saferedir_adapters.tiny import tiny_sd_pipeline

from saferedir_sdk.concepts import OutcomeJudge
from saferedir_sdk.training import PromptPairs, TrainConfig, record_trajectories
from saferedir_sdk.training.blends import blend_trajectories
from saferedir_sdk.training.trainer import train_bundle

OTHER = "a tan circle"


def _redness(images: np.ndarray) -> np.ndarray:
    rgb = images.reshape(len(images), -1, 3).astype(np.float64).mean(axis=1)
    return rgb[:, 0] > rgb[:, 1:].mean(axis=1)


def test_decode_latents_gives_what_the_pipeline_returns(pipe):
    adapter = StableDiffusionAdapter(pipe)
    kw = {"seed": 0, "num_inference_steps": 2, "guidance_scale": 7.5}
    latents = adapter.output_images(adapter.generate([FORGET, OTHER], output_type="latent", **kw))
    images = np.asarray(adapter.output_images(adapter.generate([FORGET, OTHER], output_type="np", **kw)))
    decoded = adapter.decode_latents(latents)
    assert decoded.dtype == np.uint8 and decoded.shape == images.shape
    assert np.abs(decoded.astype(int) - (images * 255).round().astype(int)).max() <= 1


def test_decode_latents_un_normalises_with_a_vae_s_latent_statistics_as_sdxl_does():
    from saferedir_adapters.sdxl import StableDiffusionXLAdapter
    from saferedir_adapters.tiny import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline(0)
    channels = pipe.vae.config.latent_channels
    pipe.vae.register_to_config(latents_mean=[0.1 * c for c in range(channels)], latents_std=[0.5] * channels)
    adapter = StableDiffusionXLAdapter(pipe)
    kw = {"seed": 0, "num_inference_steps": 2, "guidance_scale": 5.0}
    latents = adapter.output_images(adapter.generate([FORGET, OTHER], output_type="latent", **kw))
    images = np.asarray(adapter.output_images(adapter.generate([FORGET, OTHER], output_type="np", **kw)))
    decoded = adapter.decode_latents(latents)
    assert np.abs(decoded.astype(int) - (images * 255).round().astype(int)).max() <= 1
    with torch.no_grad():  # without the statistics: another image
        plain = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    unnormalised = (pipe.image_processor.postprocess(plain, output_type="np") * 255).round().astype(int)
    assert np.abs(decoded.astype(int) - unnormalised).max() > 1


def test_decode_latents_is_refused_by_a_pipeline_with_no_way_to_decode(pipe, monkeypatch):
    adapter = StableDiffusionAdapter(pipe)
    monkeypatch.setattr(pipe, "vae", None)
    monkeypatch.setattr(pipe, "decode_latents", None, raising=False)
    with pytest.raises(NotImplementedError, match="StableDiffusionAdapter cannot decode latents"):
        adapter.decode_latents(torch.zeros(1, 4, 8, 8))


def _recorded(pipe, prompts, seeds=(0,)):
    adapter = StableDiffusionAdapter(pipe)
    kw = {"seeds": list(seeds), "num_inference_steps": STEPS, "guidance_scale": 7.5}
    return adapter, record_trajectories(adapter, prompts, **kw)


def test_a_blend_mixes_two_paths_from_one_noise_and_is_labelled_by_its_decoded_image(pipe):
    adapter, forget = _recorded(pipe, [FORGET, FORGET])
    _, other = _recorded(pipe, [OTHER, OTHER])
    seen: list[np.ndarray] = []

    def judge(images: np.ndarray) -> np.ndarray:
        seen.append(images.copy())
        return _redness(images)

    blends = blend_trajectories(
        forget, [other], per_generation=3, weights=(0.25, 0.75), decode=adapter.decode_latents, outcome=judge
    )
    assert len(blends) == 2 * 3 * STEPS and blends.labels is not None
    assert sorted(blends.prompt_ids.unique().tolist()) == list(range(6))
    for b in range(6):
        rows = (blends.prompt_ids == b).nonzero().flatten()
        source = int(b // 3)  # the blends of the first generation come first
        mine = (forget.prompt_ids == source).nonzero().flatten()
        theirs = (other.prompt_ids == source).nonzero().flatten()
        # one weight w for every step: the rows are (1 - w) * mine + w * theirs, latents and prompt
        diff = other.latents[theirs] - forget.latents[mine]
        w = float(
            (blends.latents[rows] - forget.latents[mine]).flatten() @ diff.flatten() / diff.pow(2).sum()
        )
        assert 0.25 <= w <= 0.75
        torch.testing.assert_close(
            blends.latents[rows], forget.latents[mine] + w * diff, rtol=1e-4, atol=1e-5
        )
        mixed = (1 - w) * forget.cond.tokens[0][mine] + w * other.cond.tokens[0][theirs]
        torch.testing.assert_close(blends.cond.tokens[0][rows], mixed, rtol=1e-4, atol=1e-5)
        assert torch.equal(blends.timesteps[rows], forget.timesteps[mine])
        # labelled by the judge's verdict on its own last latent, decoded
        last = rows[blends.steps[rows].argmax()]
        verdict = _redness(adapter.decode_latents(blends.latents[last : last + 1]))[0]
        assert blends.labels[rows].tolist() == [float(verdict)] * STEPS
    assert sum(len(s) for s in seen) == 6


def test_a_blend_needs_a_partner_that_started_from_the_same_noise(pipe):
    adapter, forget = _recorded(pipe, [FORGET, FORGET])
    _, elsewhere = _recorded(pipe, [OTHER, OTHER], seeds=(1,))  # another seed: other noise
    kw = {"per_generation": 1, "weights": (0.2, 0.8), "decode": adapter.decode_latents, "outcome": _redness}
    with pytest.raises(
        ValueError, match="no forget generation has a partner that started from the same noise"
    ):
        blend_trajectories(forget, [elsewhere], **kw)
    moved = replace(elsewhere, seeds=torch.zeros_like(elsewhere.seeds))  # same seed number, other noise
    with pytest.raises(ValueError, match="no forget generation has a partner"):
        blend_trajectories(forget, [moved], **kw)
    for bad, match in (
        ({"weights": (0.8, 0.2)}, "weights: expected"),
        ({"per_generation": 0}, "per_generation"),
    ):
        with pytest.raises(ValueError, match=match):
            blend_trajectories(forget, [forget], **{**kw, **bad})


def test_train_bundle_classifies_labelled_blends_of_every_forget_generation(tmp_path):
    pipe = tiny_sd_pipeline(0)
    pairs = PromptPairs(list(RED_PAIRS) * 2, [OTHER])
    cfg = TrainConfig(
        concept="red", seeds=(0,), num_inference_steps=STEPS, guidance_scale=7.5, steps=10, eval_every=5,
        batch_size=16, blends=2, blend_weights=(0.3, 0.7),
    )  # fmt: skip
    summary = train_bundle(
        pipe, pairs, cfg, tmp_path / "red.safetensors", cache_dir=tmp_path / "cache",
        outcome=OutcomeJudge("redness", _redness), progress=False,
    )  # fmt: skip
    blends = summary["data"]["blends"]
    # 8 training and 2 held-out forget generations (heldout_fraction 0.2), 2 blends each
    assert {k: v["rows"] for k, v in blends.items()} == {"forget": 16 * STEPS, "heldout_forget": 4 * STEPS}
    assert all(0.0 <= v["unsafe_share"] <= 1.0 for v in blends.values())
    assert summary["heldout"]["heldout_blended_accuracy_by_t"]
    assert summary["config"]["blends"] == 2 and tuple(summary["config"]["blend_weights"]) == (0.3, 0.7)
    assert float(summary["final_train_losses"]["classified"]) > 0.0
    plain = train_bundle(
        pipe, pairs, replace(cfg, blends=0), tmp_path / "plain.safetensors", cache_dir=tmp_path / "cache",
        outcome=OutcomeJudge("redness", _redness), progress=False,
    )  # fmt: skip
    assert "blends" not in plain["data"] and plain["final_train_losses"]["classified"] == 0.0


def test_blends_are_refused_without_a_judge_or_with_bad_weights(tmp_path):
    for bad in ({"blends": -1}, {"blends": 1.5}):
        with pytest.raises(ValueError, match="blends: expected a whole number >= 0"):
            TrainConfig(concept="red", **bad)
    for weights in ((0.8, 0.2), (-0.1, 0.5), (0.5, 1.1)):
        with pytest.raises(ValueError, match="blend_weights: expected"):
            TrainConfig(concept="red", blend_weights=weights)
    cfg = TrainConfig(concept="red", seeds=(0,), num_inference_steps=STEPS, steps=1, blends=1)
    out = tmp_path / "red.safetensors"
    with pytest.raises(ValueError, match="blends: only the concept's outcome judge"):
        train_bundle(
            tiny_sd_pipeline(0), PromptPairs(list(RED_PAIRS), []), cfg, out, cache_dir=None, progress=False
        )
    assert not out.exists()


def test_a_classifier_fitted_where_it_decides_is_evaluated_there_on_its_classified_rows_too(pipe):
    from saferedir_sdk import Redirector, RedirectorConfig
    from saferedir_sdk.capacity import Capacity
    from saferedir_sdk.training import fit_redirector

    adapter, forget = _recorded(pipe, [FORGET, FORGET])
    _, other = _recorded(pipe, [OTHER, OTHER])
    blends = blend_trajectories(
        forget, [other], per_generation=1, weights=(0.5, 0.5), decode=adapter.decode_latents, outcome=_redness
    )
    labelled = forget.labelled(1.0)
    torch.manual_seed(0)
    capacity = Capacity(hidden_dim=16, rank=2, classifier_reads="latent", classifier_encoder="own")
    red = Redirector(RedirectorConfig.for_backbone(adapter.fingerprint(), capacity))
    kw = {"heldout": (forget, other), "steps": 1, "eval_every": 1, "trainable": "classifier"}
    late = fit_redirector(
        red, forget, other, redirected=labelled, heldout_redirected=labelled, blended=blends,
        heldout_blended=blends, classify_below=0.5, **kw,
    )  # fmt: skip
    for name in (
        "heldout_redirected_accuracy_by_t",
        "heldout_blended_accuracy_by_t",
        "heldout_accuracy_by_t",
    ):
        assert set(late.heldout[name]) <= {"t0.00-0.25", "t0.25-0.50"}, name
    every = fit_redirector(red, forget, other, redirected=labelled, heldout_blended=blends, **kw)
    assert "t0.75-1.00" in every.heldout["heldout_blended_accuracy_by_t"]
