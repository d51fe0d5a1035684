"""Every way around the guard that a reviewer tried (issue #12, items 5, 6, 7 and 13): enforced,
refused, or recorded; never a silent pass."""

from __future__ import annotations

import inspect
import threading

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from helpers import FORGET, RETAIN, STEPS, generate
from saferedir_adapters.tiny import tiny_sd_pipeline

from saferedir_sdk import EnforcementError, GuardBuildError, SafeRedirGuard


def _block_policy(write_policy, bundles, **top):
    rule = {
        "concept": "red",
        "category": "custom",
        "redirector": {"path": str(bundles["red"])},
        "action": "block",
    }
    return write_policy([rule], **top)


def _unet_call(pipe):
    return lambda: pipe.unet(
        torch.randn(2, 4, 32, 32), torch.tensor(500), encoder_hidden_states=torch.randn(2, 77, 32)
    )


BYPASSES = {
    "base class __call__": lambda pipe: StableDiffusionPipeline.__call__(
        pipe, [FORGET], num_inference_steps=STEPS, output_type="np"
    ),
    "from_pipe": lambda pipe: StableDiffusionPipeline.from_pipe(pipe)([FORGET], num_inference_steps=STEPS),
    "img2img from its components": lambda pipe: StableDiffusionImg2ImgPipeline(**pipe.components)(
        [FORGET], image=torch.rand(1, 3, 64, 64), num_inference_steps=STEPS, strength=0.8
    ),
    "denoiser called directly": lambda pipe: _unet_call(pipe)(),
}


@pytest.mark.parametrize("path", BYPASSES)
def test_the_guarded_denoiser_refuses_calls_it_cannot_attribute(pipe, write_policy, audit_records, path):
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    with pytest.raises(EnforcementError, match="outside a guarded call"):
        BYPASSES[path](pipe)
    generate(pipe)  # the wrapped pipeline itself still works
    assert guard.last_report.outcome == "redirected"


def test_a_pipeline_built_from_wrapped_components_is_guarded_once_wrapped_by_the_same_guard(
    pipe, write_policy, audit_records
):
    policy = write_policy()
    guard = SafeRedirGuard.from_policy(policy)
    guard.wrap(pipe)
    img2img = guard.wrap(StableDiffusionImg2ImgPipeline(**pipe.components))
    image = torch.rand(1, 3, 64, 64)
    img2img([FORGET], image=image, num_inference_steps=STEPS, strength=0.8, output_type="np")
    assert guard.last_report.outcome == "redirected"  # its own hook enforced; pipe's stood aside
    generate(pipe)
    assert guard.last_report.outcome == "redirected"
    assert len(audit_records()) == 2
    # another guard (another policy, possibly weaker) on the shared UNet: pipe's policy is not
    # enforced on that call, so pipe's hook still refuses it
    other = SafeRedirGuard.from_policy(write_policy())
    guard.unwrap(img2img)
    other.wrap(img2img)
    with pytest.raises(EnforcementError, match="inside request"):
        img2img([FORGET], image=image, num_inference_steps=STEPS, strength=0.8)


def test_under_open_an_unattributed_denoiser_call_runs_and_is_audited(pipe, write_policy, audit_records):
    guard = SafeRedirGuard.from_policy(write_policy(fail_mode="open"))
    guard.wrap(pipe)
    with pytest.warns(UserWarning, match="outside a guarded call"):
        _unet_call(pipe)()
    (record,) = audit_records("saferedir.unattributed")
    assert record["fail_open"][0]["concept"] == "*"


@pytest.mark.parametrize("component", ["unet", "text_encoder"])
def test_a_component_replaced_after_wrap_is_an_enforcement_failure(
    pipe, write_policy, audit_records, component
):
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    setattr(pipe, component, getattr(tiny_sd_pipeline(0), component))
    with pytest.raises(EnforcementError, match=f"pipe.{component} was replaced"):
        generate(pipe)
    assert audit_records()[0]["outcome"] == "error"


def test_a_replaced_unet_under_open_is_recorded_not_reported_as_ok(pipe, write_policy, audit_records):
    guard = SafeRedirGuard.from_policy(write_policy(fail_mode="open"))
    guard.wrap(pipe)
    pipe.unet = tiny_sd_pipeline(0).unet
    with pytest.warns(UserWarning, match="replaced"):
        generate(pipe)
    record = audit_records()[0]
    assert any("pipe.unet was replaced" in f["reason"] for f in record["fail_open"])


def test_unwrap_is_refused_while_a_call_runs_in_another_thread(pipe, write_policy, audit_records):
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    seen = []

    def unwrap_from_elsewhere(_pipe, step, _t, tensors):
        if step == 1:
            worker = threading.Thread(target=lambda: seen.append(_try(lambda: guard.unwrap(pipe))))
            worker.start()
            worker.join()
        return tensors

    generate(pipe, callback_on_step_end=unwrap_from_elsewhere)
    assert isinstance(seen[0], GuardBuildError) and "still running" in str(seen[0])
    record = audit_records()[0]
    assert record["outcome"] == "redirected" and record["steps"] == STEPS
    guard.unwrap(pipe)  # after the call it works


def _try(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test inspects it
        return exc
    return None


def test_block_withholds_the_flagged_latents_from_step_callbacks(pipe, write_policy, bundles, audit_records):
    reference = []
    generate(pipe, callback_on_step_end=lambda p, i, t, k: reference.append(k["latents"].clone()) or k)
    guard = SafeRedirGuard.from_policy(_block_policy(write_policy, bundles))
    guard.wrap(pipe)
    seen = []

    def spy(_pipe, _step, _t, tensors):
        seen.append(tensors["latents"].clone())
        return {"latents": tensors["latents"] + 0.0}  # hands back what it saw, as many callbacks do

    out = generate(pipe, callback_on_step_end=spy, output_type="latent").images
    assert [s["action"] for s in audit_records()[0]["samples"]] == ["blocked", "none"]
    assert all(not s[0].any() for s in seen), "the blocked sample's latents never reach the callback"
    assert torch.equal(seen[-1][1], reference[-1][1]), "the benign sample's are untouched"
    assert not out[0].any() and torch.equal(out[1], reference[-1][1])


def test_a_preview_never_sees_a_rewound_sample_s_unredirected_latents(pipe, write_policy, bundles):
    """With ``rewind`` the first run goes on unredirected for a flagged sample while its batch mate
    finishes: a step callback (a preview) sees its latents only until the rule flags it, zeros after,
    then the redirected second run; what it returns for the hidden rows is ignored."""
    rule = {"concept": "red", "category": "custom", "redirector": {"path": str(bundles["red"])}}
    reference = []
    generate(pipe, callback_on_step_end=lambda p, i, t, k: reference.append(k["latents"].clone()) or k)
    guard = SafeRedirGuard.from_policy(write_policy([rule]))
    plain = generate(guard.wrap(pipe)).images  # redirected from its first check, step 0
    guard.unwrap(pipe)
    # decide_at_t 0.3: of the tiny pipeline's 4 steps the check at step 2 is the first that decides
    guard = SafeRedirGuard.from_policy(write_policy([{**rule, "decide_at_t": 0.3, "rewind": True}]))
    guard.wrap(pipe)
    seen = []

    def preview(_pipe, _step, _t, tensors):
        seen.append(tensors["latents"].clone())
        return {"latents": tensors["latents"] * 1.0}  # hands back what it saw

    images = generate(pipe, callback_on_step_end=preview).images
    assert guard.last_report.samples[0].concepts[0].rewound and len(seen) == 2 * STEPS
    first, second = seen[:STEPS], seen[STEPS:]
    for step, (got, ref) in enumerate(zip(first, reference)):
        assert torch.equal(got[1], ref[1]), "the benign sample's first run is the unguarded one"
        if step < 2:  # before the check at step 2 flags it: what an unguarded call shows too
            assert torch.equal(got[0], ref[0])
        else:
            assert not got[0].any(), f"step {step}: the flagged sample's unredirected latents are hidden"
    assert all(s[0].abs().sum() > 0 for s in second), "the second run, redirected, is shown"
    assert np.array_equal(images, plain), "the callback's zeros never reach the generation"


def test_calls_on_four_threads_with_mixed_guidance_do_not_interfere(write_policy, audit_records):
    """One guard, four pipelines (one per thread: a diffusers pipeline object itself is not
    thread-safe, its scheduler keeps per-call state), guidance 1.0 and 7.5 mixed."""
    guard = SafeRedirGuard.from_policy(write_policy())
    pipes = [guard.wrap(tiny_sd_pipeline(0)) for _ in range(4)]
    expected = {}
    for scale in (1.0, 7.5):
        generate(pipes[0], guidance_scale=scale)
        expected[scale] = [s.action for s in guard.last_report.samples]
    errors, actions = [], []

    def work(t):
        for i in range(25):
            scale = (1.0, 7.5)[(t + i) % 2]
            try:
                generate(pipes[t], guidance_scale=scale, seed=i)
                actions.append((scale, [s.action for s in guard.last_report.samples]))
            except Exception as exc:  # noqa: BLE001 - counted
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(actions) == 100
    assert all(a == expected[scale] for scale, a in actions), "no cross-talk between calls"
    records = audit_records()[2:]
    assert len(records) == 100 and len({r["request_id"] for r in records}) == 100
    assert sum(r["cfg"] for r in records) == 50, "CFG read from each call's own tensors (50 of 100 used it)"
    assert all(r["outcome"] == "redirected" for r in records)


def test_the_guarded_call_keeps_the_pipelines_signature_and_docstring(pipe, write_policy):
    before = inspect.signature(pipe.__call__)
    doc = type(pipe).__call__.__doc__
    SafeRedirGuard.from_policy(write_policy()).wrap(pipe)
    assert inspect.signature(pipe.__call__) == before and type(pipe).__call__.__doc__ == doc


def test_wrapping_leaves_the_images_of_a_non_firing_guard_bit_identical(pipe, write_policy):
    base = generate(pipe, prompts=[RETAIN, RETAIN]).images
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    assert np.array_equal(generate(pipe, prompts=[RETAIN, RETAIN]).images, base)
