"""Audit records: exactly one generation record per guarded call (after its start record), JSON,
complete, chained, prompts as the policy says."""

from __future__ import annotations

import hashlib
import json

import pytest
from helpers import FORGET, RETAIN, STEPS, generate

from saferedir_sdk import SafeRedirGuard

FIELDS = {
    "event",
    "schema_version",
    "time",
    "request_id",
    "policy",
    "backbone",
    "bundles",
    "backbone_mismatch",
    "components",
    "adapter",
    "fail_mode",
    "fail_open",
    "steps",
    "rehearsed_steps",
    "side_conditioning",
    "cfg",
    "samples",
    "latency_ms",
    "outcome",
    "error",
    "seq",
    "prev",
    "hash",
}


def test_one_complete_record_per_call_without_raw_prompts(pipe, write_policy, audit_records, tmp_path):
    path = write_policy()
    guard = SafeRedirGuard.from_policy(path)
    guard.wrap(pipe)
    for prompts in ([FORGET, RETAIN], [RETAIN], [FORGET]):
        generate(pipe, prompts=prompts)
    raw = (tmp_path / "audit.jsonl").read_text()
    records = audit_records()
    assert len(records) == 3
    every = audit_records(None)
    assert [r["event"] for r in every] == ["saferedir.call_started", "saferedir.generation"] * 3
    assert [r["seq"] for r in every] == list(range(6)) and all(
        a["hash"] == b["prev"] for a, b in zip(every, every[1:])
    )
    assert len({r["request_id"] for r in records}) == 3
    for record in records:
        assert set(record) == FIELDS
        assert record["event"] == "saferedir.generation" and record["schema_version"] == 11
        assert record["policy"] == {"name": "test", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        assert record["backbone"]["streams"] == [{"name": "text_encoder", "seq_len": 77, "dim": 32}]
        assert len(record["backbone"]["encoders"][0]["weights_sha256"]) == 64
        assert record["adapter"] == {"adapter": "sd1", "pipeline": "StableDiffusionPipeline"}
        assert record["steps"] == STEPS and record["latency_ms"] > 0 and record["error"] is None
        for sample in record["samples"]:
            assert set(sample) == {"index", "prompt_index", "prompt", "action", "concepts"}
            assert sample["prompt"].startswith("sha256:")
            (concept,) = sample["concepts"]
            assert set(concept) == {
                "concept",
                "category",
                "rule_action",
                "checks",
                "max_score",
                "triggered",
                "first_step",
                "escalation",
                "applied",
                "rewound",
                "unresolved",
                "withheld",
                "gates_opened",
                "max_deciding_score",
                "shift",
            }
    assert [r["outcome"] for r in records] == ["redirected", "ok", "redirected"]
    assert records[0]["samples"][0]["prompt"] == "sha256:" + hashlib.sha256(FORGET.encode()).hexdigest()
    assert FORGET not in raw and RETAIN not in raw and "red circle" not in raw
    assert (
        records[0]["request_id"] == guard.last_report.request_id
        or records[-1]["request_id"] == guard.last_report.request_id
    )


@pytest.mark.parametrize("mode, expected", [("full", FORGET), ("none", None)])
def test_prompt_logging_modes(pipe, write_policy, audit_records, tmp_path, mode, expected):
    guard = SafeRedirGuard.from_policy(
        write_policy(audit={"sinks": ["file"], "file": str(tmp_path / "audit.jsonl"), "prompt_logging": mode})
    )
    guard.wrap(pipe)
    generate(pipe)
    assert audit_records()[0]["samples"][0]["prompt"] == expected


def test_stdout_sink_prints_one_json_line_per_call(pipe, write_policy, capsys):
    guard = SafeRedirGuard.from_policy(write_policy(audit={"sinks": ["stdout"]}))
    guard.wrap(pipe)
    capsys.readouterr()
    generate(pipe)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["event"] for r in lines] == ["saferedir.call_started", "saferedir.generation"]
    assert lines[1]["outcome"] == "redirected"


def test_failed_call_still_writes_exactly_one_error_record(pipe, write_policy, audit_records):
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)
    with pytest.raises(ValueError):
        generate(pipe, negative_prompt=["one"])  # diffusers refuses 1 negative for 2 prompts
    (record,) = audit_records()
    assert record["outcome"] == "error" and record["error"]["type"] == "ValueError" and record["steps"] == 0


def test_unwritable_audit_fails_closed(pipe, write_policy, tmp_path):
    from saferedir_sdk import EnforcementError

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    guard = SafeRedirGuard.from_policy(
        write_policy(audit={"sinks": ["file"], "file": str(blocker / "audit.jsonl")})
    )
    guard.wrap(pipe)
    with pytest.raises(EnforcementError, match="audit record could not be written"):
        generate(pipe)
