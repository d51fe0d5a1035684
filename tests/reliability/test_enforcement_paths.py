"""Every way around the guard that a reviewer tried (issue #12, items 5, 6, 7 and 13): enforced,
refused, or recorded; never a silent pass."""

from __future__ import annotations

import copy
import inspect
import pickle
import threading
import warnings

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


@pytest.mark.parametrize("component", ["unet", "text_encoder", "tokenizer"])
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


def _edit_in_place(module):
    """A fused LoRA's kind of edit: a low-rank delta added through ``.data`` (no version bump, the
    same storage, the same tensor names)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for weight in (p for p in module.parameters() if p.ndim == 2):
            a = torch.randn(weight.shape[0], 2, generator=generator)
            weight.data += 0.01 * a @ torch.randn(2, weight.shape[1], generator=generator)


TEXT_ENCODER_EDITS = {
    "a LoRA fused into its weights": lambda pipe: _edit_in_place(pipe.text_encoder),
    "load_state_dict": lambda pipe: pipe.text_encoder.load_state_dict(
        tiny_sd_pipeline(1).text_encoder.state_dict()
    ),
    "a textual inversion loaded": lambda pipe: pipe.load_textual_inversion(
        {
            "<x>": torch.randn(
                pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0)
            )
        },
        token="<x>",
    ),
}


@pytest.mark.parametrize("edit", TEXT_ENCODER_EDITS)
def test_text_encoder_weights_changed_after_wrap_are_an_enforcement_failure(
    pipe, write_policy, audit_records, edit
):
    """wrap matched the bundles to the text encoder (and tokenizer) it fingerprinted; edited after
    wrap, the call fails under closed as wrap itself would have refused them, and the record names
    the weights the call had. Wrapping again is refused the same way."""
    from saferedir_sdk.errors import BackboneMismatchError
    from saferedir_sdk.fingerprint import module_sha256

    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    generate(pipe)
    TEXT_ENCODER_EDITS[edit](pipe)
    with pytest.raises(
        EnforcementError, match=r"pipe.text_encoder \(.*changed after wrap: encoders\[text_encoder\]"
    ):
        generate(pipe)
    before, after = audit_records()
    assert after["outcome"] == "error"
    assert after["components"]["text_encoder"] == module_sha256(pipe.text_encoder)
    assert after["components"]["text_encoder"] != before["components"]["text_encoder"]
    assert after["components"]["unet"] == before["components"]["unet"]
    guard.unwrap(pipe)
    with pytest.raises(BackboneMismatchError):
        guard.wrap(pipe)


def test_a_token_added_to_the_tokenizer_after_wrap_is_an_enforcement_failure(
    pipe, write_policy, audit_records
):
    """Another vocabulary than the one wrap fingerprinted, with the text encoder's weights
    untouched (tokens added, the embedding not resized): the call fails as wrap would refuse it."""
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    count = len(pipe.tokenizer)
    pipe.tokenizer.add_tokens(["<y>"])
    with pytest.raises(
        EnforcementError,
        match=rf"pipe.tokenizer \({count} tokens at wrap, {count + 1} now\) changed after wrap: "
        r"encoders\[text_encoder\].tokenizer",
    ):
        generate(pipe)
    assert audit_records()[0]["outcome"] == "error"


def test_text_encoder_weights_changed_after_wrap_under_open_are_recorded(pipe, write_policy, audit_records):
    guard = SafeRedirGuard.from_policy(write_policy(fail_mode="open"))
    guard.wrap(pipe)
    _edit_in_place(pipe.text_encoder)
    with pytest.warns(UserWarning, match="NOT enforced"):
        generate(pipe)
    (record,) = audit_records()
    assert any("pipe.text_encoder" in f["reason"] for f in record["fail_open"])


def test_unet_weights_changed_after_wrap_are_enforced_as_a_fresh_wrap_would_and_recorded(
    write_policy, audit_records
):
    """wrap enforces on an edited UNet (a pre-unlearned backbone); edited after wrap, the call does
    the same: the image a fresh wrap of the edited pipeline gives, a warning once, and every record
    from then on carries the edited UNet's hash. Moving the pipeline to another dtype is no edit."""
    from saferedir_sdk.fingerprint import module_sha256

    policy = write_policy()
    pipe, fresh = tiny_sd_pipeline(0), tiny_sd_pipeline(0)
    SafeRedirGuard.from_policy(policy).wrap(pipe)
    generate(pipe)
    _edit_in_place(pipe.unet)
    _edit_in_place(fresh.unet)
    with pytest.warns(UserWarning, match="pipe.unet's weights changed after wrap"):
        edited = generate(pipe).images
    SafeRedirGuard.from_policy(policy).wrap(fresh)
    np.testing.assert_array_equal(edited, generate(fresh).images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the new weights are the checked ones
        generate(pipe)
        pipe.to(torch.bfloat16)
        generate(pipe)
    first, second, of_fresh, third, in_bf16 = audit_records()
    digest = module_sha256(fresh.unet)
    assert first["components"]["unet"] != digest
    assert (
        second["components"]["unet"]
        == third["components"]["unet"]
        == of_fresh["components"]["unet"]
        == digest
    )
    assert in_bf16["components"] == third["components"]
    assert [s["action"] for s in second["samples"]] == ["redirected", "none"]


def test_a_weights_probe_sees_an_edit_and_not_a_move_to_another_dtype():
    """What the guard reads per call to tell whether a hooked module's weights changed since wrap."""
    import copy

    from saferedir_sdk.fingerprint import WeightsProbe

    module = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.LayerNorm(8))
    module.register_buffer("ids", torch.arange(5))
    base = WeightsProbe.read(module)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        moved = WeightsProbe.read(copy.deepcopy(module).to(dtype))
        assert moved.changed_since(base) is None and base.changed_since(moved) is None, dtype
    mixed = copy.deepcopy(module)  # diffusers' layerwise casting: float8 storage for some layers only
    mixed[0].to(torch.float8_e4m3fn)
    assert WeightsProbe.read(mixed).changed_since(base) is None
    edited = copy.deepcopy(module)
    edited[0].weight.data[0, 0] += 0.01  # element 0 of every tensor is probed
    assert (
        WeightsProbe.read(edited).changed_since(base) == f"1 of {base.values.numel()} probed values changed"
    )
    edited = copy.deepcopy(module)
    edited[0] = torch.nn.Linear(16, 9)
    assert WeightsProbe.read(edited).changed_since(base) == "tensors reshaped '0.bias' and 1 more"
    edited = copy.deepcopy(module)
    edited.add_module("lora", torch.nn.Linear(2, 2))
    assert WeightsProbe.read(edited).changed_since(base) == "tensors added 'lora.bias' and 1 more"


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
        for i in range(12):
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
    assert errors == [] and len(actions) == 48
    assert all(a == expected[scale] for scale, a in actions), "no cross-talk between calls"
    records = audit_records()[2:]
    assert len(records) == 48 and len({r["request_id"] for r in records}) == 48
    assert sum(r["cfg"] for r in records) == 24, "CFG read from each call's own tensors (24 of 48 used it)"
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


def test_a_wrapped_pipeline_refuses_to_be_copied_or_pickled_and_copies_once_unwrapped(
    pipe, write_policy, audit_records
):
    """A copy of a wrapped pipeline would share the original's wrapping and carry hooks bound to it:
    copy, deepcopy and pickle raise GuardBuildError saying what to do, and the original stays
    wrapped and guarded; unwrapped, it copies, and the copy is wrapped on its own."""
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(GuardBuildError, match=r"cannot be copied or pickled: unwrap it"):
            attempt(pipe)
    assert "_saferedir_wrapping" in pipe.__dict__
    generate(pipe)  # still guarded: the call is audited
    assert len(audit_records()) == 1
    guard.unwrap(pipe)
    twin = copy.deepcopy(pipe)
    assert type(twin) is type(pipe) and "_saferedir_wrapping" not in twin.__dict__
    guard.wrap(pipe)
    guard.wrap(twin)
    assert twin.unet is not pipe.unet and twin.__dict__["_saferedir_wrapping"].pipe is twin
    generate(twin)
    assert len(audit_records()) == 2
