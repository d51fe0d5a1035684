"""A call too short for a rule to decide enforced nothing for it: fewer checks that could trigger
(at a normalised timestep <= decide_at_t, inside its window, every replace_steps + 1 steps) than
the rule needs (1; confirm_checks for a rewind rule). Closed: the call fails; open: it runs, warns
and says so in its record. On the tiny pipeline's 4 steps (t 0.751, 0.501, 0.251, 0.001), checked
at steps 0 and 2."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import generate

from saferedir_sdk import EnforcementError, SafeRedirGuard


def red_rule(bundles, **kw) -> list[dict]:
    return [{"concept": "red", "category": "custom", "redirector": {"path": str(bundles["red"])}, **kw}]


def refused(pipe, policy, match: str) -> None:
    """A guarded call under ``policy`` raises the EnforcementError ``match`` names."""
    guard = SafeRedirGuard.from_policy(policy)
    guard.wrap(pipe)
    try:
        with pytest.raises(EnforcementError, match=match):
            generate(pipe)
    finally:
        guard.unwrap(pipe)


@pytest.mark.parametrize(
    "rule, says",
    [({"decide_at_t": 0.001}, "decide_at_t 0.001"), ({"window": {"start": 4}}, "window 4..end")],
    ids=["decide_at_t below every check", "window after the last step"],
)
def test_a_call_too_short_for_a_rule_to_decide_fails_closed(
    pipe, write_policy, bundles, audit_records, rule, says
):
    """decide_at_t 0.001: the checks at steps 0 and 2 (t 0.751, 0.251) never decide; a window from
    step 4 has no check in a 4-step call. Either way the rule enforces nothing: the call fails and
    its record says why."""
    policy = write_policy(red_rule(bundles, **rule))
    refused(pipe, policy, r"rule 'red' had 0 check\(s\) that could trigger for samples \[0, 1\]")
    record = audit_records()[-1]
    assert record["outcome"] == "error" and says in record["error"]["message"]


def test_a_rewind_rule_needs_confirm_checks_deciding_checks(pipe, write_policy, bundles):
    """With rewind the rule acts only on what it confirmed in the first run: confirm_checks 2 with one
    deciding check (step 2) can flag nothing, so nothing was enforced."""
    policy = write_policy(red_rule(bundles, decide_at_t=0.3, rewind=True, confirm_checks=2))
    refused(pipe, policy, r"had 1 check\(s\).*needs 2.*confirm_checks 2 with rewind")


def test_under_fail_mode_open_a_short_call_runs_and_says_so(pipe, write_policy, bundles, audit_records):
    base = generate(pipe).images
    guard = SafeRedirGuard.from_policy(write_policy(red_rule(bundles, decide_at_t=0.001), fail_mode="open"))
    guard.wrap(pipe)
    try:
        with pytest.warns(UserWarning, match="rule 'red' had 0 check"):
            images = generate(pipe).images
    finally:
        guard.unwrap(pipe)
    assert np.array_equal(images, base)
    (entry,) = audit_records()[-1]["fail_open"]
    assert entry["concept"] == "red" and "needs 1" in entry["reason"]
    assert guard.last_report.outcome == "ok"
