"""Numerical faults at run time (issue #12, item 4): a NaN score never reads as "safe" and a NaN
delta never reaches the denoiser; either is an enforcement failure, recorded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import generate

from saferedir_sdk import EnforcementError, SafeRedirGuard


def _strict_json(record: dict) -> None:
    """The record as strict JSON: a bare NaN/Infinity (not JSON) would raise."""

    def refuse(constant):
        raise AssertionError(f"bare {constant} in an audit record")

    json.loads(json.dumps(record), parse_constant=refuse)


def _poison(pipe, part: str):
    """Make the wrapped pipeline's redirector return NaN in ``part``: a NaN in the weights the engine
    runs (what an fp16 overflow or a corrupted weight does) of its classifier's last layer or of
    its token delta head."""
    stack = pipe.__dict__["_saferedir_wrapping"].engine.groups[0].stack
    name = "classifier.4.bias" if part == "logit" else "delta_ups.0.bias"
    stack.weights[name].fill_(math.nan)


@pytest.mark.parametrize("part", ["logit", "directions"])
def test_non_finite_redirector_output_fails_closed(pipe, write_policy, audit_records, part):
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    _poison(pipe, part)
    with pytest.raises(EnforcementError, match="non-finite"):
        generate(pipe)
    (record,) = audit_records()
    assert record["outcome"] == "error" and "non-finite" in record["error"]["message"]
    _strict_json(record)


@pytest.mark.parametrize("part", ["logit", "directions"])
def test_non_finite_redirector_output_under_open_is_recorded_and_never_reaches_the_image(
    pipe, write_policy, audit_records, part
):
    guard = SafeRedirGuard.from_policy(write_policy(fail_mode="open"))
    guard.wrap(pipe)
    _poison(pipe, part)
    with pytest.warns(UserWarning, match="non-finite"):
        images = generate(pipe).images
    assert np.isfinite(images).all()
    (record,) = audit_records()
    assert [f["concept"] for f in record["fail_open"]] == ["red"]
    assert "non-finite" in record["fail_open"][0]["reason"]
    _strict_json(record)
    if part == "logit":  # a NaN score counts as a trigger: both samples are flagged, not passed as safe
        assert all(s["concepts"][0]["first_step"] == 0 for s in record["samples"])
