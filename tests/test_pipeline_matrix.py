"""One ``guard.wrap(pipe)`` for every supported pipeline (issue #13): tiny random-weights pipelines
built offline, a redirector fitted on the family's own trajectories, and per pipeline: the concept
prompt is redirected and only it, the benign sample is bit-identical to an unwrapped run with the
same seed, and each call leaves exactly one generation record.

Redirectors are fitted once per backbone family on the text-to-image pipeline; its img2img,
inpaint and ControlNet variants share the text encoders and the latent channels, which is what a
bundle's fingerprint names (the UNet is not part of it: a pre-unlearned UNet keeps bundles valid).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    HeunDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPAGPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPAGPipeline,
)
from helpers import FAMILIES, FORGET, RETAIN, STEPS, UNetRecorder, inpaint_mask, input_image
from saferedir_adapters.tiny import (
    tiny_adapter,
    tiny_controlnet_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)

from saferedir_sdk import EnforcementError, SafeRedirGuard

# pipeline -> (family, builder, extra call arguments)
CASES = {
    "sd1 txt2img": ("sd1", lambda: tiny_sd_pipeline(0), {}),
    "sd1 img2img": (
        "sd1",
        lambda: StableDiffusionImg2ImgPipeline(**tiny_sd_pipeline(0).components),
        {"image": input_image(), "strength": 0.75},
    ),
    "sd1 inpaint (9-channel UNet)": (
        "sd1",
        lambda: tiny_sd_pipeline(0, in_channels=9, pipeline_class=StableDiffusionInpaintPipeline),
        {"image": input_image(), "mask_image": inpaint_mask()},
    ),
    "sd1 controlnet": ("sd1", tiny_controlnet_pipeline, {"image": input_image()}),
    "sd2 v-prediction txt2img": ("sd2-v", FAMILIES["sd2-v"], {}),
    "sdxl txt2img": ("sdxl", FAMILIES["sdxl"], {}),
    "sdxl img2img": (
        "sdxl",
        lambda: tiny_sdxl_pipeline(0, pipeline_class=StableDiffusionXLImg2ImgPipeline),
        {"image": input_image(), "strength": 0.75},
    ),
    "sdxl inpaint": (
        "sdxl",
        lambda: tiny_sdxl_pipeline(0, pipeline_class=StableDiffusionXLInpaintPipeline),
        {"image": input_image(), "mask_image": inpaint_mask(), "strength": 0.9},
    ),
    "sdxl refiner-style img2img (text_encoder_2 only)": (
        "sdxl-refiner",
        lambda: tiny_sdxl_pipeline(
            0, second_encoder_only=True, pipeline_class=StableDiffusionXLImg2ImgPipeline
        ),
        {"image": input_image(), "strength": 0.75},
    ),
    # perturbed-attention guidance with CFG: [uncond; cond; cond (perturbed attention)]
    "sd1 PAG": (
        "sd1",
        lambda: StableDiffusionPAGPipeline(**tiny_sd_pipeline(0).components, pag_applied_layers=["mid"]),
        {},
    ),
    "sdxl PAG": (
        "sdxl",
        lambda: StableDiffusionXLPAGPipeline(**tiny_sdxl_pipeline(0).components, pag_applied_layers=["mid"]),
        {},
    ),
}


# a pipeline the adapters claim (a UNet and the family's text encoders) whose denoiser batch is not
# [uncond; cond] of the call's batch: InstructPix2Pix batches [cond; image-only; uncond]. The guard
# cannot tell which rows are the prompt's, so the call fails under `closed` (no image comes back
# unguarded).
UNREADABLE = {
    "sd1 InstructPix2Pix (8-channel UNet)": (
        "sd1",
        lambda: tiny_sd_pipeline(0, in_channels=8, pipeline_class=StableDiffusionInstructPix2PixPipeline),
        {"image": input_image()},
    ),
}


def _policy(path, bundle: str):
    doc = {
        "version": 1,
        "name": "matrix",
        "audit": {"sinks": ["file"], "file": str(path.parent / "audit.jsonl")},
        "concepts": [{"concept": "red", "category": "custom", "redirector": {"path": bundle}}],
    }
    path.write_text(json.dumps(doc))
    return path


def _run(pipe, extra):
    out = pipe(
        [FORGET, RETAIN],
        num_inference_steps=STEPS,
        output_type="np",
        generator=torch.Generator().manual_seed(7),
        **extra,
    )
    return out.images


@pytest.mark.parametrize("case", CASES)
def test_one_wrap_guards_every_supported_pipeline(case, family_bundles, tmp_path):
    family, build, extra = CASES[case]
    audit = tmp_path / "audit.jsonl"
    policy = _policy(tmp_path / "policy.json", family_bundles[family])
    pipe = build()
    unguarded = _run(pipe, extra)
    guard = SafeRedirGuard.from_policy(policy)
    guard.wrap(pipe)
    guarded = _run(pipe, extra)
    report = guard.last_report
    assert [s.action for s in report.samples] == ["redirected", "none"], case
    assert report.steps > 0
    assert np.array_equal(guarded[1], unguarded[1]), f"{case}: the benign sample changed"
    assert not np.array_equal(guarded[0], unguarded[0]), f"{case}: the flagged sample did not change"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    generation = [r for r in records if r["event"] == "saferedir.generation"]
    assert len(generation) == 1 and generation[0]["backbone"]["family"] == tiny_adapter(pipe).name
    guard.unwrap(pipe)
    assert np.array_equal(_run(pipe, extra), unguarded), f"{case}: unwrap did not restore the pipeline"


@pytest.mark.parametrize("case", UNREADABLE)
def test_a_claimed_pipeline_whose_denoiser_batch_is_not_uncond_cond_fails_closed(
    case, family_bundles, tmp_path
):
    family, build, extra = UNREADABLE[case]
    pipe = build()
    guard = SafeRedirGuard.from_policy(_policy(tmp_path / "policy.json", family_bundles[family]))
    guard.wrap(pipe)
    with pytest.raises(EnforcementError, match=r"sample: expected shape a batch of 2 \(no CFG\) or 4"):
        _run(pipe, extra)
    (record,) = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()][-1:]
    assert record["event"] == "saferedir.generation" and record["outcome"] == "error", case
    assert "TensorShapeError: sample" in record["error"]["message"], case


def _runs_recorded(pipe, extra, policy):
    """``pipe`` run unguarded, then wrapped in a guard of ``policy``, each run's UNet calls recorded:
    (unguarded calls, guarded calls, unguarded images, guarded images, the guarded call's report)."""
    plain = UNetRecorder(pipe.unet)
    unguarded = _run(pipe, extra)
    plain.remove()
    guard = SafeRedirGuard.from_policy(policy)
    guard.wrap(pipe)
    seen = UNetRecorder(pipe.unet)
    guarded = _run(pipe, extra)
    seen.remove()
    return plain, seen, unguarded, guarded, guard.last_report


@pytest.mark.parametrize("cfg", [False, True], ids=["without CFG", "with CFG"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_perturbed_attention_guidance_redirects_every_copy_of_the_prompt(
    cfg, family, family_bundles, tmp_path
):
    # PAG batches the conditional rows twice, the second copy run with its self-attention perturbed:
    # [cond; cond] without CFG, shaped like [uncond; cond], where the image is drawn from the first
    # copy; [uncond; cond; cond] with CFG. Every copy of the flagged prompt must move, the same way
    cls = StableDiffusionXLPAGPipeline if family == "sdxl" else StableDiffusionPAGPipeline
    pipe = cls(**FAMILIES[family]().components, pag_applied_layers=["mid"])
    extra = {"guidance_scale": 7.5 if cfg else 1.0, "pag_scale": 3.0}
    plain, seen, unguarded, guarded, report = _runs_recorded(
        pipe, extra, _policy(tmp_path / "policy.json", family_bundles[family])
    )
    assert [s.action for s in report.samples] == ["redirected", "none"]
    assert len(seen.calls) == STEPS
    # rows: [(uncond red, uncond tan,) red, tan, red perturbed, tan perturbed]
    first, second = (2, 4) if cfg else (0, 2)
    others = [0, 1, 3, 5] if cfg else [1, 3]
    for call, (moved, original) in enumerate(zip(seen.calls, plain.calls)):
        assert moved["ehs"].shape[0] == (6 if cfg else 4)
        for key in ("ehs", "pooled") if family == "sdxl" else ("ehs",):
            assert torch.equal(moved[key][first], moved[key][second]), (
                call,
                key,
                "both copies of the prompt",
            )
            assert not torch.equal(moved[key][first], original[key][first]), (call, key)
            assert torch.equal(moved[key][others], original[key][others]), (call, key)
    assert np.array_equal(guarded[1], unguarded[1]) and not np.array_equal(guarded[0], unguarded[0])


def test_a_second_order_scheduler_is_guarded_call_by_call(family_bundles, tmp_path):
    # Heun calls the UNet twice per step but the last (2 * STEPS - 1 calls): each call is a check,
    # the flagged sample's conditional row is redirected in every call from its first trigger on,
    # and the record's steps count the calls
    pipe = tiny_sd_pipeline(0)
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    plain, seen, _, _, report = _runs_recorded(
        pipe, {}, _policy(tmp_path / "policy.json", family_bundles["sd1"])
    )
    assert [s.action for s in report.samples] == ["redirected", "none"]
    assert report.steps == len(seen.calls) == len(plain.calls) == 2 * STEPS - 1
    first = report.samples[0].concepts[0].first_step
    for call, (guarded, unguarded) in enumerate(zip(seen.calls, plain.calls)):
        # rows: [uncond red, uncond tan, cond red, cond tan]
        assert torch.equal(guarded["ehs"][2], unguarded["ehs"][2]) == (call < first), call
        assert torch.equal(guarded["ehs"][[0, 1, 3]], unguarded["ehs"][[0, 1, 3]]), call


def test_sdxl_records_prompt_2_with_the_prompt():
    pipe = tiny_sdxl_pipeline(0)
    info = tiny_adapter(pipe).call_info((["a cat", "a dog"],), {"prompt_2": ["a cat", "in red"]})
    assert info.prompts == ["a cat", "a dog\nin red"] and info.batch_size == 2
    assert tiny_adapter(pipe).call_info(("a cat",), {}).prompts == ["a cat"]


def test_sdxl_redirects_the_pooled_embedding_of_the_flagged_sample_only(family_bundles, tmp_path):
    policy = tmp_path / "policy.json"
    rule = {"concept": "red", "category": "custom", "redirector": {"path": family_bundles["sdxl"]}}
    policy.write_text(
        json.dumps({"version": 1, "name": "pooled", "audit": {"sinks": []}, "concepts": [rule]})
    )

    def pooled_seen(pipe) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        hook = pipe.unet.register_forward_pre_hook(  # after the guard's: sees what the UNet gets
            lambda _m, _a, kw: seen.append(kw["added_cond_kwargs"]["text_embeds"].clone()), with_kwargs=True
        )
        _run(pipe, {})
        hook.remove()
        return seen

    pipe = tiny_sdxl_pipeline(0)
    plain = pooled_seen(pipe)
    guard = SafeRedirGuard.from_policy(policy)
    guard.wrap(pipe)
    guarded = pooled_seen(pipe)
    assert [s.action for s in guard.last_report.samples] == ["redirected", "none"]
    # batch [uncond forget, uncond retain, cond forget, cond retain]: only row 2 may change
    changed = [not torch.equal(a, b) for a, b in zip(plain[-1], guarded[-1])]
    assert changed == [False, False, True, False]
    assert all(torch.equal(p[3], g[3]) and torch.equal(p[:2], g[:2]) for p, g in zip(plain, guarded))
