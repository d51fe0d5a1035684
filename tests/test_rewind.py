"""``rewind``: decide on the trajectory the unguarded model takes, then regenerate the flagged samples
from the same starting noise, redirected from the start (the guard on a real tiny diffusers
StableDiffusionPipeline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import FORGET, RETAIN, STEPS, UNetRecorder, generate

from saferedir_sdk import PolicyError, SafeRedirGuard


def red_rule(bundles, **kw) -> list[dict]:
    # decide_at_t 0.3: of the tiny pipeline's 4 steps (t 0.751, 0.501, 0.251, 0.001) the check at
    # step 2 is the first that decides
    return [{"concept": "red", "category": "custom", "redirector": {"path": str(bundles["red"])}, **kw}]


def run(pipe, policy, prompts=(FORGET, RETAIN), **kwargs):
    """(images, report, the conditional embeddings the UNet received per call) of one guarded call."""
    guard = SafeRedirGuard.from_policy(policy)
    guard.wrap(pipe)
    seen = UNetRecorder(pipe.unet)
    try:
        images = generate(pipe, prompts, **kwargs).images
    finally:
        seen.remove()
        guard.unwrap(pipe)
    return images, guard.last_report, seen.calls


def test_rewind_decides_unmoved_then_redirects_the_flagged_sample_from_the_first_step(
    pipe, write_policy, bundles, audit_records
):
    # what redirecting from step 0 gives: the plain rule triggers "a red circle" at its first check
    plain, plain_report, _ = run(pipe, write_policy(red_rule(bundles)))
    assert plain_report.samples[0].concepts[0].first_step == 0
    base = generate(pipe).images
    reference = UNetRecorder(pipe.unet)
    generate(pipe)
    reference.remove()

    images, report, calls = run(pipe, write_policy(red_rule(bundles, decide_at_t=0.3, rewind=True)))
    assert len(calls) == 2 * STEPS, "a first run that flagged a sample, then the second"
    for got, ref in zip(calls[:STEPS], reference.calls):
        assert torch.equal(got["ehs"], ref["ehs"]), "the first run moves nothing"
    assert np.array_equal(images, plain), "flagged sample redirected from step 0, the other unguarded"
    assert np.array_equal(images[1], base[1])
    red, tan = (s.concepts[0] for s in report.samples)
    assert red.rewound and red.first_step == 2 and red.triggered and red.checks == 4
    assert report.samples[0].action == "redirected" and report.samples[1].action == "none"
    assert not tan.rewound and tan.first_step is None
    # the scores the rule decided on: at or above its threshold for the flagged sample, below for the
    # other (checks of both runs at t <= 0.3; max_score also holds the t 0.751 and 0.501 checks)
    threshold = 0.5  # the policy default
    assert red.max_deciding_score >= threshold > tan.max_deciding_score
    assert tan.max_score >= tan.max_deciding_score
    assert report.rehearsed_steps == STEPS and report.steps == STEPS
    record = audit_records()[-1]
    assert len(audit_records()) == 2, "one record per guarded call"
    assert record["rehearsed_steps"] == STEPS and record["samples"][0]["concepts"][0]["rewound"] is True
    assert [s["concepts"][0]["max_deciding_score"] for s in record["samples"]] == [
        red.max_deciding_score,
        tan.max_deciding_score,
    ]


def test_a_call_a_rewind_rule_does_not_flag_runs_once_and_unchanged(pipe, write_policy, bundles):
    base = generate(pipe, (RETAIN,)).images
    images, report, calls = run(pipe, write_policy(red_rule(bundles, rewind=True)), (RETAIN,))
    assert len(calls) == STEPS and np.array_equal(images, base)
    assert report.rehearsed_steps == 0 and report.outcome == "ok"


def test_the_first_run_stops_once_every_sample_is_flagged(pipe, write_policy, bundles):
    plain, _, _ = run(pipe, write_policy(red_rule(bundles)), (FORGET,))
    images, report, calls = run(
        pipe, write_policy(red_rule(bundles, decide_at_t=0.3, rewind=True)), (FORGET,)
    )
    # first run: steps 0 and 1 reach the UNet; the check at step 2 flags and ends it there
    assert len(calls) == 2 + STEPS and report.rehearsed_steps == 3
    assert np.array_equal(images, plain)


def test_the_second_run_replays_the_global_rng_when_no_generator_is_passed(pipe, write_policy, bundles):
    def call(p):
        torch.manual_seed(11)
        out = p([FORGET, RETAIN], num_inference_steps=STEPS, output_type="np").images
        return out, torch.get_rng_state()

    base, after_base = call(pipe)
    guard = SafeRedirGuard.from_policy(write_policy(red_rule(bundles)))
    plain, _ = call(guard.wrap(pipe))
    guard.unwrap(pipe)
    guard = SafeRedirGuard.from_policy(write_policy(red_rule(bundles, decide_at_t=0.3, rewind=True)))
    images, after = call(guard.wrap(pipe))
    assert guard.last_report.rehearsed_steps == STEPS
    assert np.array_equal(images, plain) and np.array_equal(images[1], base[1])
    assert torch.equal(after, after_base), "the caller's RNG ends where one unguarded call leaves it"


@pytest.mark.parametrize("extra", [{"sticky": False}, {"action": "monitor"}])
def test_rewind_needs_a_sticky_redirect_rule(write_policy, bundles, extra):
    with pytest.raises(PolicyError, match="concept 'red': rewind needs action redirect and sticky true"):
        SafeRedirGuard.from_policy(write_policy(red_rule(bundles, rewind=True, **extra)))


def test_redirect_at_t_leaves_the_regenerated_sample_unmoved_until_that_noise_level(
    pipe, write_policy, bundles
):
    reference = UNetRecorder(pipe.unet)
    base = generate(pipe).images
    reference.remove()
    _, _, from_start = run(pipe, write_policy(red_rule(bundles, decide_at_t=0.3, rewind=True)))
    # t 0.751 (step 0) is above 0.6: the second run moves the flagged sample from step 1 on
    policy = write_policy(red_rule(bundles, decide_at_t=0.3, rewind=True, redirect_at_t=0.6))
    images, report, calls = run(pipe, policy)
    assert len(calls) == 2 * STEPS
    second, b = calls[STEPS:], 2  # rows [uncond; cond] of a batch of 2: "a red circle" is row 2
    assert torch.equal(second[0]["ehs"], reference.calls[0]["ehs"]), "step 0 unmoved"
    for got, ref in zip(second[1:], reference.calls[1:]):
        assert not torch.equal(got["ehs"][b], ref["ehs"][b]), "moved from step 1"
        assert torch.equal(got["ehs"][b + 1], ref["ehs"][b + 1]), "the unflagged sample never"
        assert torch.equal(got["ehs"][:b], ref["ehs"][:b]), "nor the unconditional half"
    assert not torch.equal(second[1]["sample"], from_start[STEPS + 1]["sample"]), "a later start differs"
    assert np.array_equal(images[1], base[1]) and not np.array_equal(images[0], base[0])
    red = report.samples[0].concepts[0]
    assert red.rewound and red.applied and report.samples[0].action == "redirected"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"redirect_at_t": 0.6}, "redirect_at_t 0.6 needs rewind true"),
        (
            {"redirect_at_t": 0.2, "decide_at_t": 0.3, "rewind": True},
            r"redirect_at_t \(0.2\) must be at or above decide_at_t \(0.3\)",
        ),
    ],
)
def test_redirect_at_t_needs_a_rewind_rule_deciding_at_or_below_it(write_policy, bundles, extra, message):
    with pytest.raises(PolicyError, match=f"concept 'red': {message}"):
        SafeRedirGuard.from_policy(write_policy(red_rule(bundles, **extra)))
