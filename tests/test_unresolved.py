"""``unresolved``: a redirection that did not clear its concept (the last checks while redirected still
saw it) is recorded in every audit record, and under ``unresolved: block`` its image is withheld
(the guard on a real tiny diffusers StableDiffusionPipeline)."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import generate

from saferedir_sdk import (
    GenerationBlocked,
    GuardBuildError,
    PolicyError,
    SafeRedirGuard,
)


def red_rule(bundles, **kw) -> list[dict]:
    # a push far too weak to move the tiny pipeline's red circle: every check keeps seeing it
    base = {"strength": 0.01, "replace_steps": 0}
    return [
        {"concept": "red", "category": "custom", "redirector": {"path": str(bundles["red"])}, **base, **kw}
    ]


def guarded(pipe, policy, **kwargs):
    guard = SafeRedirGuard.from_policy(policy)
    guard.wrap(pipe)
    try:
        return generate(pipe, **kwargs).images, guard.last_report
    finally:
        guard.unwrap(pipe)


def test_an_unresolved_redirection_is_recorded_and_kept_by_default(
    pipe, write_policy, latent_red, bundles, audit_records
):
    images, report = guarded(pipe, write_policy(red_rule(latent_red)))
    red, tan = (s.concepts[0] for s in report.samples)
    assert red.triggered and red.unresolved and not red.withheld
    assert tan.unresolved is False and tan.first_step is None
    assert [s.action for s in report.samples] == ["redirected", "none"]
    assert images[0].std() > 0, "kept: the redirected image is returned"
    concept = audit_records()[-1]["samples"][0]["concepts"][0]
    assert concept["unresolved"] is True and concept["withheld"] is False
    # a classifier that reads the prompt too cannot tell: None, not False
    _, report = guarded(pipe, write_policy(red_rule(bundles)))
    assert report.samples[0].concepts[0].triggered and report.samples[0].concepts[0].unresolved is None
    # (a check that no longer sees the concept clears it: tests/test_engine.py)


def test_unresolved_block_withholds_only_the_image_the_redirection_did_not_clear(
    pipe, write_policy, latent_red, audit_records
):
    base = generate(pipe).images
    images, report = guarded(pipe, write_policy(red_rule(latent_red, unresolved="block")))
    assert [s.action for s in report.samples] == ["blocked", "none"] and report.outcome == "blocked"
    assert report.samples[0].concepts[0].withheld and report.blocked == [0]
    assert np.unique(images[0]).tolist() == [0.0], "the policy's placeholder (black)"
    assert np.array_equal(images[1], base[1]), "the benign sample is returned unchanged"
    record = audit_records()[-1]
    assert record["outcome"] == "blocked" and record["samples"][0]["concepts"][0]["withheld"] is True

    guard = SafeRedirGuard.from_policy(
        write_policy(red_rule(latent_red, unresolved="block"), block={"mode": "raise"})
    )
    guard.wrap(pipe)
    try:
        with pytest.raises(GenerationBlocked) as info:
            generate(pipe)
        assert info.value.report.blocked == [0]
    finally:
        guard.unwrap(pipe)


def test_unresolved_block_needs_a_redirect_rule_and_a_classifier_that_reads_the_latent_alone(
    write_policy, bundles, latent_red
):
    with pytest.raises(PolicyError, match="concept 'red': unresolved block needs action redirect"):
        SafeRedirGuard.from_policy(write_policy(red_rule(latent_red, unresolved="block", action="monitor")))
    with pytest.raises(PolicyError, match="unresolved"):
        SafeRedirGuard.from_policy(write_policy(red_rule(latent_red, unresolved="drop")))
    with pytest.raises(GuardBuildError, match=r"red.safetensors: concept 'red': .*reads latent\+prompt"):
        SafeRedirGuard.from_policy(write_policy(red_rule(bundles, unresolved="block")))
