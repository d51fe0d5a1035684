"""A ControlNet reads the prompt too: its residuals enter the UNet at every step. The guard hooks it
(``Adapter.conditioned_modules``): the step decides at the ControlNet's call and the ControlNet
and the UNet both receive that step's redirected conditioning, so no part of a flagged sample's
denoiser input comes from the original prompt (real tiny diffusers ControlNet pipelines: SD's and
SDXL's, whose ControlNet also reads the pooled embedding, txt2img, img2img and inpaint)."""

from __future__ import annotations

import diffusers
import pytest
import torch
from helpers import FORGET, RETAIN, STEPS, UNetRecorder, inpaint_mask, input_image
from saferedir_adapters.tiny import (
    tiny_controlnet_pipeline,
)

from saferedir_sdk import EnforcementError, SafeRedirGuard

#: the ControlNet pipelines of each family besides txt2img, and what their calls take beside the
#: control image (strength 1.0: every step of the schedule runs)
TASKS = {
    "img2img": (
        {
            "sd1": "StableDiffusionControlNetImg2ImgPipeline",
            "sdxl": "StableDiffusionXLControlNetImg2ImgPipeline",
        },
        {},
    ),
    "inpaint": (
        {
            "sd1": "StableDiffusionControlNetInpaintPipeline",
            "sdxl": "StableDiffusionXLControlNetInpaintPipeline",
        },
        {"mask_image": inpaint_mask()},
    ),
}


def task_pipeline(family: str, task: str):
    """The tiny ControlNet pipeline of ``family`` for ``task`` and the extra call arguments:
    txt2img takes the control image as ``image``; img2img and inpaint take the initial image as
    ``image`` and the control image as ``control_image``."""
    pipe = tiny_controlnet_pipeline(0, xl=family == "sdxl")
    if task == "txt2img":
        return pipe, {}
    classes, extra = TASKS[task]
    pipe = getattr(diffusers, classes[family])(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"control_image": input_image(), "strength": 1.0, **extra}


def call(pipe, prompts=(FORGET, RETAIN), **kwargs):
    return pipe(
        list(prompts),
        image=input_image(),
        num_inference_steps=STEPS,
        output_type="np",
        generator=torch.Generator().manual_seed(7),
        **kwargs,
    )


def recorded(pipe, policy=None, *, recorders: list | None = None, **kwargs):
    """(ControlNet calls, UNet calls, report) of one call, guarded by ``policy`` unless None
    (``recorders``: a list the two recorders are appended to)."""
    guard = SafeRedirGuard.from_policy(policy) if policy is not None else None
    if guard is not None:
        guard.wrap(pipe)
    controlnet, unet = UNetRecorder(pipe.controlnet), UNetRecorder(pipe.unet)  # it records any module
    try:
        call(pipe, **kwargs)
        if recorders is not None:
            recorders.extend([controlnet, unet])
    finally:
        controlnet.remove()
        unet.remove()
        if guard is not None:
            guard.unwrap(pipe)
    return (
        [c["ehs"] for c in controlnet.calls],
        [c["ehs"] for c in unet.calls],
        guard.last_report if guard else None,
    )


@pytest.fixture
def cn_pipe():
    return tiny_controlnet_pipeline(0)


@pytest.mark.parametrize("task", ["txt2img", "img2img", "inpaint"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_controlnet_receives_the_redirected_conditioning_of_every_step(
    family, task, write_policy, request
):
    pipe, kwargs = task_pipeline(family, task)
    policy = write_policy()
    if family == "sdxl":
        rule = {
            "concept": "red",
            "category": "custom",
            "redirector": {"path": request.getfixturevalue("family_bundles")["sdxl"]},
        }
        policy = write_policy([rule])
    plain: list = []
    original, _, _ = recorded(pipe, recorders=plain, **kwargs)
    seen: list = []
    controlnet, unet, report = recorded(pipe, policy, recorders=seen, **kwargs)
    assert report.samples[0].action == "redirected" and report.samples[1].action == "none"
    assert report.steps == STEPS, "one engine step per denoising step, not one per hooked module"
    assert len(controlnet) == len(unet) == STEPS
    first = report.samples[0].concepts[0].first_step
    for step, (cn, un, orig) in enumerate(zip(controlnet, unet, original)):
        assert torch.equal(cn, un), f"step {step}: the ControlNet and the UNet read one conditioning"
        # rows: [uncond red, uncond tan, cond red, cond tan]
        assert torch.equal(cn[[0, 1, 3]], orig[[0, 1, 3]]), "only the flagged sample's cond row moves"
        assert torch.equal(cn[2], orig[2]) == (step < first), step
    (cn_seen, unet_seen), plain_cn = seen, plain[0]
    cn_pooled = [c["pooled"] for c in cn_seen.calls if "pooled" in c]
    plain_pooled = [c["pooled"] for c in plain_cn.calls if "pooled" in c]
    assert len(cn_pooled) == len(plain_pooled) == (STEPS if family == "sdxl" else 0)
    for step, (cn, un, orig) in enumerate(zip(cn_pooled, unet_seen.calls, plain_pooled)):
        assert torch.equal(cn, un["pooled"]), f"step {step}: one pooled embedding too"
        assert torch.equal(cn[2], orig[2]) == (step < first), step


def test_guess_mode_gives_the_controlnet_the_redirected_conditional_rows(cn_pipe, write_policy, bundles):
    # guess mode: the ControlNet reads only the conditional rows; the UNet's unconditional half,
    # which that call did not have, is moved as one engine step moves it (apply_to_uncond: the same
    # delta as the conditional row)
    rule = {"concept": "red", "category": "custom", "apply_to_uncond": True}
    policy = write_policy([{**rule, "redirector": {"path": str(bundles["red"])}}])
    _, original, _ = recorded(cn_pipe, guess_mode=True)
    controlnet, unet, report = recorded(cn_pipe, policy, guess_mode=True)
    assert [s.action for s in report.samples] == ["redirected", "none"]
    assert len(controlnet) == len(unet) == STEPS
    first = report.samples[0].concepts[0].first_step
    for step, (cn, un, orig) in enumerate(zip(controlnet, unet, original)):
        assert cn.shape[0] == 2 and torch.equal(cn, un[2:]), step
        assert torch.equal(un[[1, 3]], orig[[1, 3]]), step
        moved = un - orig
        assert torch.allclose(moved[0], moved[2], atol=1e-6), step
        assert bool(moved[0].abs().sum() > 0) == (step >= first), step


def test_a_rewind_rule_redirects_the_controlnet_in_the_second_run(cn_pipe, write_policy, bundles):
    rule = {"concept": "red", "category": "custom", "decide_at_t": 0.3, "rewind": True}
    policy = write_policy([{**rule, "redirector": {"path": str(bundles["red"])}}])
    original, _, _ = recorded(cn_pipe)
    controlnet, unet, report = recorded(cn_pipe, policy)
    assert report.rehearsed_steps == STEPS and report.steps == STEPS
    assert len(controlnet) == len(unet) == 2 * STEPS
    for step, (cn, un) in enumerate(zip(controlnet, unet)):
        assert torch.equal(cn, un), step
    assert all(torch.equal(cn, orig) for cn, orig in zip(controlnet[:STEPS], original)), (
        "the first run decides"
    )
    assert all(not torch.equal(cn[2], orig[2]) for cn, orig in zip(controlnet[STEPS:], original))
    assert report.samples[0].action == "redirected" and report.samples[1].action == "none"


def with_other_conditioning(pipe, policy, expect) -> SafeRedirGuard:
    """One guarded call whose ControlNet reads other conditioning than the UNet (a pre-hook
    registered before wrap adds 1 to what the ControlNet reads; the UNet's conditioning is then not
    the one the step was redirected on), run inside ``expect``; returns the guard."""
    handle = pipe.controlnet.register_forward_pre_hook(
        lambda _m, args, kwargs: (
            args,
            {**kwargs, "encoder_hidden_states": kwargs["encoder_hidden_states"] + 1.0},
        ),
        with_kwargs=True,
    )
    guard = SafeRedirGuard.from_policy(policy)
    guard.wrap(pipe)
    try:
        with expect:
            call(pipe)
    finally:
        guard.unwrap(pipe)
        handle.remove()
    return guard


def test_a_controlnet_given_another_prompt_than_the_unet_fails_closed(cn_pipe, write_policy):
    # the guard refuses rather than guess which conditioning the step meant
    expect = pytest.raises(EnforcementError, match="other prompt conditioning than the ControlNet")
    guard = with_other_conditioning(cn_pipe, write_policy(), expect)
    assert guard.last_report.outcome == "error"


def test_the_controlnet_is_part_of_the_wrapped_pipeline(cn_pipe, write_policy, audit_records):
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(cn_pipe)
    call(cn_pipe)
    assert "controlnet" in audit_records()[-1]["components"]
    with pytest.raises(
        EnforcementError, match="the controlnet of a StableDiffusionControlNetPipeline .* outside"
    ):
        cn_pipe.controlnet(
            torch.zeros(1, 4, 32, 32),
            torch.tensor(1),
            encoder_hidden_states=torch.zeros(1, 77, 32),
            controlnet_cond=torch.zeros(1, 3, 64, 64),
        )
    cn_pipe.controlnet = tiny_controlnet_pipeline(1).controlnet
    with pytest.raises(EnforcementError, match="pipe.controlnet was replaced"):
        call(cn_pipe)
    guard.unwrap(cn_pipe)
    assert not cn_pipe.controlnet._forward_pre_hooks and not cn_pipe.unet._forward_pre_hooks


def test_under_fail_mode_open_the_mismatch_is_recorded_and_every_step_still_decides(
    cn_pipe, write_policy, audit_records
):
    expect = pytest.warns(UserWarning, match="NOT enforced")
    guard = with_other_conditioning(cn_pipe, write_policy(fail_mode="open"), expect)
    assert guard.last_report.steps == STEPS, "the ControlNet's call of each step still ran the engine"
    (failure,) = audit_records()[-1]["fail_open"]
    assert "other prompt conditioning than the ControlNet" in failure["reason"]
