"""The guard end to end on a real diffusers StableDiffusionPipeline (tiny, random weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FORGET, RETAIN, STEPS, UNetRecorder, generate
from PIL import Image

from saferedir_sdk import (
    BackboneMismatchError,
    EnforcementError,
    GenerationBlocked,
    GuardBuildError,
    SafeRedirGuard,
)


def test_redirect_moves_only_the_flagged_samples_conditional_half(pipe, write_policy, audit_records):
    reference = UNetRecorder(pipe.unet)
    base = generate(pipe).images
    reference.remove()

    guard = SafeRedirGuard.from_policy(write_policy())
    assert guard.wrap(pipe) is pipe
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    seen = UNetRecorder(pipe.unet)  # registered after the guard's hook: sees what the UNet gets
    guarded = generate(pipe).images
    seen.remove()

    assert len(seen.calls) == len(reference.calls) == STEPS
    for ref, got in zip(reference.calls, seen.calls):
        # CFG batch is [uncond(forget), uncond(retain), cond(forget), cond(retain)]
        assert torch.equal(got["ehs"][0:2], ref["ehs"][0:2]), "unconditional half must not move"
        assert torch.equal(got["ehs"][3], ref["ehs"][3]), "the benign sample must not move"
        assert not torch.equal(got["ehs"][2], ref["ehs"][2]), (
            "the flagged sample moves from the first check on"
        )
    assert np.array_equal(guarded[1], base[1]), "benign sample must be bit-identical to the unwrapped run"
    assert not np.array_equal(guarded[0], base[0])

    report = guard.last_report
    assert report.outcome == "redirected" and report.cfg is True and report.steps == STEPS
    assert [s.action for s in report.samples] == ["redirected", "none"]
    red = report.samples[0].concepts[0]
    assert red.triggered and red.first_step == 0 and red.max_score > 0.5
    assert red.checks == 2  # replace_steps 1: steps 0 and 2
    assert report.samples[1].concepts[0].max_score < 0.5
    assert len(audit_records()) == 1

    guard.unwrap(pipe)
    restored = generate(pipe).images
    assert np.array_equal(restored, base), "unwrap must restore bit-identical output"
    assert len(audit_records()) == 1, "unwrapped calls are not audited"


def test_without_cfg_only_the_flagged_sample_moves(pipe, write_policy):
    reference = UNetRecorder(pipe.unet)
    base = generate(pipe, guidance_scale=1.0).images
    reference.remove()
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    seen = UNetRecorder(pipe.unet)
    out = generate(pipe, guidance_scale=1.0).images
    seen.remove()
    assert seen.calls[0]["ehs"].shape[0] == 2
    assert torch.equal(seen.calls[0]["ehs"][1], reference.calls[0]["ehs"][1])
    assert not torch.equal(seen.calls[0]["ehs"][0], reference.calls[0]["ehs"][0])
    assert np.array_equal(out[1], base[1]) and not np.array_equal(out[0], base[0])
    assert guard.last_report.cfg is False
    assert [s.action for s in guard.last_report.samples] == ["redirected", "none"]


def test_num_images_per_prompt_maps_samples_to_prompts(pipe, write_policy):
    base = generate(pipe, num_images_per_prompt=2).images
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    out = generate(pipe, num_images_per_prompt=2).images
    report = guard.last_report
    assert [s.prompt_index for s in report.samples] == [0, 0, 1, 1]
    assert [s.action for s in report.samples] == ["redirected", "redirected", "none", "none"]
    assert np.array_equal(out[2:], base[2:])
    assert not np.array_equal(out[0], base[0]) and not np.array_equal(out[1], base[1])


def test_prompt_embeds_passed_directly_are_still_guarded(pipe, write_policy, audit_records):
    embeds, negative = pipe.encode_prompt([FORGET, RETAIN], "cpu", 1, True)
    kwargs = {
        "prompt_embeds": embeds,
        "negative_prompt_embeds": negative,
        "num_inference_steps": STEPS,
        "output_type": "np",
    }
    base = pipe(generator=torch.Generator().manual_seed(7), **kwargs).images
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    out = pipe(generator=torch.Generator().manual_seed(7), **kwargs).images
    assert [s.action for s in guard.last_report.samples] == ["redirected", "none"]
    assert np.array_equal(out[1], base[1]) and not np.array_equal(out[0], base[0])
    assert [s["prompt"] for s in audit_records()[0]["samples"]] == [None, None]


def test_negative_prompts_stay_put_unless_the_policy_moves_them(pipe, write_policy, bundles):
    negatives = ["blurry", "blurry"]
    reference = UNetRecorder(pipe.unet)
    generate(pipe, negative_prompt=negatives)
    reference.remove()

    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    seen = UNetRecorder(pipe.unet)
    generate(pipe, negative_prompt=negatives)
    seen.remove()
    assert torch.equal(seen.calls[0]["ehs"][:2], reference.calls[0]["ehs"][:2])
    guard.unwrap(pipe)

    concepts = [
        {
            "concept": "red",
            "category": "custom",
            "redirector": {"path": str(bundles["red"])},
            "apply_to_uncond": True,
        }
    ]
    both = SafeRedirGuard.from_policy(write_policy(concepts))
    both.wrap(pipe)
    seen = UNetRecorder(pipe.unet)
    generate(pipe, negative_prompt=negatives)
    seen.remove()
    ref, got = reference.calls[0]["ehs"], seen.calls[0]["ehs"]
    assert not torch.equal(got[0], ref[0]), "apply_to_uncond moves the flagged sample's negative half"
    assert torch.equal(got[1], ref[1]) and torch.equal(got[3], ref[3])
    # the same delta on both halves
    assert torch.allclose(got[0] - ref[0], got[2] - ref[2], atol=1e-6)


def test_callers_callback_on_step_end_keeps_working(pipe, write_policy):
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    seen_steps = []

    def callback(_pipe, step, _t, tensors):
        seen_steps.append(step)
        return {"latents": tensors["latents"] * 0.0}  # the caller's edit must take effect

    out = generate(
        pipe,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents"],
        output_type="latent",
    ).images
    assert seen_steps == list(range(STEPS))
    assert torch.count_nonzero(out) == 0
    assert [s.action for s in guard.last_report.samples] == ["redirected", "none"]


def test_monitor_changes_no_pixel_but_records_the_trigger(pipe, write_policy, audit_records, bundles):
    base = generate(pipe).images
    concepts = [
        {
            "concept": "red",
            "category": "custom",
            "redirector": {"path": str(bundles["red"])},
            "action": "monitor",
        }
    ]
    guard = SafeRedirGuard.from_policy(write_policy(concepts))
    guard.wrap(pipe)
    out = generate(pipe).images
    assert np.array_equal(out, base)
    assert [s.action for s in guard.last_report.samples] == ["monitored", "none"]
    record = audit_records()[0]
    assert record["outcome"] == "ok"
    assert record["samples"][0]["concepts"][0]["triggered"] is True
    assert record["samples"][0]["action"] == "monitored"


def test_block_replaces_only_the_flagged_sample(pipe, write_policy, audit_records, bundles):
    concepts = [
        {
            "concept": "red",
            "category": "custom",
            "redirector": {"path": str(bundles["red"])},
            "action": "block",
        }
    ]
    base = generate(pipe, output_type="pil").images
    guard = SafeRedirGuard.from_policy(
        write_policy(concepts, block={"mode": "placeholder", "color": [255, 0, 255]})
    )
    guard.wrap(pipe)
    out = generate(pipe, output_type="pil").images
    assert isinstance(out[0], Image.Image) and out[0].size == base[0].size
    assert np.unique(np.asarray(out[0]).reshape(-1, 3), axis=0).tolist() == [[255, 0, 255]]
    assert np.array_equal(np.asarray(out[1]), np.asarray(base[1]))
    assert audit_records()[0]["outcome"] == "blocked"
    assert [s["action"] for s in audit_records()[0]["samples"]] == ["blocked", "none"]

    for output_type in ("np", "pt"):
        images = generate(pipe, output_type=output_type).images
        flat = np.asarray(images[0]).reshape(-1)
        assert np.allclose(np.unique(flat), [0.0, 1.0]), output_type


def test_block_can_raise_to_the_caller(pipe, write_policy, audit_records, bundles):
    concepts = [
        {
            "concept": "red",
            "category": "custom",
            "redirector": {"path": str(bundles["red"])},
            "action": "block",
        }
    ]
    guard = SafeRedirGuard.from_policy(write_policy(concepts, block={"mode": "raise"}))
    guard.wrap(pipe)
    with pytest.raises(GenerationBlocked) as info:
        generate(pipe)
    assert [s.action for s in info.value.report.samples] == ["blocked", "none"]
    assert audit_records()[0]["outcome"] == "blocked"
    generate(pipe, prompts=[RETAIN])  # a benign call still works
    assert guard.last_report.outcome == "ok"


def test_two_concepts_combine_per_sample(pipe, write_policy, bundles):
    concepts = [
        {"concept": "red", "category": "custom", "redirector": {"path": str(bundles["red"])}},
        {
            "concept": "star",
            "category": "custom",
            "redirector": {"path": str(bundles["star"])},
            "action": "monitor",
        },
    ]
    guard = SafeRedirGuard.from_policy(write_policy(concepts))
    guard.wrap(pipe)
    generate(pipe, prompts=[FORGET, "a blue star", RETAIN])
    report = guard.last_report
    assert [s.action for s in report.samples] == ["redirected", "monitored", "none"]
    assert [[c.triggered for c in s.concepts] for s in report.samples] == [
        [True, False],
        [False, True],
        [False, False],
    ]


def test_schedule_window_and_replace_steps(pipe, write_policy, bundles):
    reference = UNetRecorder(pipe.unet)
    generate(pipe, num_inference_steps=6)
    reference.remove()
    concepts = [
        {
            "concept": "red",
            "category": "custom",
            "redirector": {"path": str(bundles["red"])},
            "replace_steps": 2,
            "window": {"start": 1, "stop": 5},
        }
    ]
    guard = SafeRedirGuard.from_policy(write_policy(concepts))
    guard.wrap(pipe)
    seen = UNetRecorder(pipe.unet)
    generate(pipe, num_inference_steps=6)
    seen.remove()
    moved = [not torch.equal(s["ehs"][2], r["ehs"][2]) for s, r in zip(seen.calls, reference.calls)]
    assert moved == [False, True, True, True, True, False]
    red = guard.last_report.samples[0].concepts[0]
    assert red.checks == 2 and red.first_step == 1  # checks at steps 1 and 4


def test_wrap_twice_and_foreign_unwrap_are_errors(pipe, write_policy):
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    with pytest.raises(GuardBuildError, match="already wrapped"):
        guard.wrap(pipe)
    other = SafeRedirGuard.from_policy(write_policy())
    with pytest.raises(GuardBuildError, match="not wrapped by this guard"):
        other.unwrap(pipe)


def test_backbone_mismatch_refuses_to_wrap_under_closed(write_policy):
    from saferedir_adapters.tiny import tiny_sd_pipeline

    other = tiny_sd_pipeline(0, token_dim=48)
    guard = SafeRedirGuard.from_policy(write_policy())
    with pytest.raises(BackboneMismatchError, match="streams"):
        guard.wrap(other)
    assert "_saferedir_wrapping" not in other.__dict__


def test_backbone_mismatch_under_open_runs_unguarded_and_says_so(write_policy, audit_records):
    from saferedir_adapters.tiny import tiny_sd_pipeline

    other = tiny_sd_pipeline(1)  # same dims, other text-encoder weights
    base = generate(other).images
    guard = SafeRedirGuard.from_policy(write_policy(fail_mode="open"))
    with pytest.warns(UserWarning, match="NOT enforced"):
        guard.wrap(other)
    out = generate(other).images
    assert np.array_equal(out, base)
    record = audit_records()[0]
    assert record["fail_open"][0]["concept"] == "red"
    assert "encoders[text_encoder].weights_sha256" in record["fail_open"][0]["reason"]


def test_runtime_failure_fails_closed_with_an_error_record(pipe, write_policy, audit_records, monkeypatch):
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    wrapping = pipe.__dict__["_saferedir_wrapping"]

    def broken(*_args, **_kwargs):
        raise RuntimeError("redirector exploded")

    monkeypatch.setattr(wrapping.engine.groups[0].stack, "forward", broken)
    with pytest.raises(EnforcementError, match="redirector exploded"):
        generate(pipe)
    record = audit_records()[0]
    assert record["outcome"] == "error" and record["error"]["type"] == "EnforcementError"


def test_runtime_failure_under_open_returns_images_and_records_fail_open(
    pipe, write_policy, audit_records, monkeypatch
):
    base = generate(pipe).images
    guard = SafeRedirGuard.from_policy(write_policy(fail_mode="open"))
    guard.wrap(pipe)
    wrapping = pipe.__dict__["_saferedir_wrapping"]
    monkeypatch.setattr(
        wrapping.engine.groups[0].stack,
        "forward",
        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")),
    )
    with pytest.warns(UserWarning, match="NOT enforced"):
        out = generate(pipe).images
    assert np.array_equal(out, base)
    record = audit_records()[0]
    assert record["outcome"] == "ok" and "boom" in record["fail_open"][0]["reason"]


def test_a_shift_is_read_from_the_pipelines_own_encoder_and_one_without_a_direction_does_not_wrap(
    pipe, write_policy, bundles, audit_records
):
    """A rule's ``shift`` gets its direction from the wrapped pipeline's text encoder (the prompts'
    real tokens); lists that read alike give no direction: under ``closed`` the wrap fails naming the
    concept and its shift, under ``open`` the concept is not enforced and every record says so."""
    from saferedir_adapters.sd import StableDiffusionAdapter

    from saferedir_sdk.redirector import shift_direction

    shift = {
        "scale": 0.25,
        "unsafe": ["a red square", "a crimson circle"],
        "safe": ["a blue square", "a navy circle"],
    }
    red = {"concept": "red", "category": "custom", "redirector": {"path": str(bundles["red"])}}
    guard = SafeRedirGuard.from_policy(write_policy([{**red, "shift": shift}]))
    guard.wrap(pipe)
    adapter = StableDiffusionAdapter(pipe)
    want = shift_direction(*adapter.encode_prompts(shift["unsafe"]), *adapter.encode_prompts(shift["safe"]))
    (enforced,) = pipe._saferedir_wrapping.engine.concepts
    assert torch.allclose(enforced.shift.tokens[0], want.tokens[0]) and enforced.shift.pooled is None
    generate(pipe)
    assert guard.last_report.samples[0].action == "redirected"
    guard.unwrap(pipe)

    same = {**shift, "safe": shift["unsafe"]}
    closed = SafeRedirGuard.from_policy(write_policy([{**red, "shift": same}]))
    with pytest.raises(
        GuardBuildError,
        match="concept 'red': shift: token stream 0: the safe and unsafe prompts give no direction",
    ):
        closed.wrap(pipe)
    assert "_saferedir_wrapping" not in pipe.__dict__
    base = generate(pipe).images
    opened = SafeRedirGuard.from_policy(write_policy([{**red, "shift": same}], fail_mode="open"))
    with pytest.warns(UserWarning, match="NOT enforced"):
        opened.wrap(pipe)
    assert np.array_equal(generate(pipe).images, base)
    record = audit_records()[-1]
    assert record["fail_open"][0]["concept"] == "red" and "shift" in record["fail_open"][0]["reason"]
