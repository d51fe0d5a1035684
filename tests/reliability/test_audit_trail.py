"""The audit trail under pressure (issue #12, items 8, 9, 10 and 14): tamper evidence, every sink
gets every record, no success record for a failed call, killed calls visible, no blocking open,
keyed prompt hashes, no prompt text in error messages, nothing truncated."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time

import pytest
from helpers import FORGET, RETAIN, generate

from saferedir_sdk import EnforcementError, GuardBuildError, SafeRedirGuard
from saferedir_sdk.audit import AuditTrail, verify_audit_file
from saferedir_sdk.cli import main
from saferedir_sdk.errors import AuditWriteError
from saferedir_sdk.policy import AuditSettings


def _trail(path, *, sinks=("file",), extra=(), **settings) -> AuditTrail:
    return AuditTrail(
        AuditSettings(sinks=list(sinks), file=str(path), **settings),
        policy_name="t",
        policy_sha256="0" * 64,
        extra_sinks=extra,
    )


def _file_with_records(tmp_path, n=6):
    path = tmp_path / "audit.jsonl"
    trail = _trail(path)
    for i in range(n):
        trail.emit(f"r{i}", {"outcome": "blocked" if i == 2 else "ok", "samples": [{"index": 0}]})
    return path


def _verify(path, capsys) -> tuple[int, str]:
    code = main(["audit", "verify", str(path)])
    return code, capsys.readouterr().out


def test_verify_says_ok_on_an_untouched_file_and_the_chain_survives_a_restart(tmp_path, capsys):
    path = _file_with_records(tmp_path, 3)
    _trail(path).emit("after-restart", {"outcome": "ok"})  # a new process (trail) continues the chain
    code, out = _verify(path, capsys)
    assert code == 0 and "OK: 4 records" in out and "last seq 3" in out


def _lines(path):
    return path.read_text().splitlines(keepends=True)


TAMPERING = {
    "rewritten record": lambda ls: ls[:2] + [ls[2].replace('"blocked"', '"ok"')] + ls[3:],
    "rewritten last record": lambda ls: ls[:-1] + [ls[-1].replace('"ok"', '"blocked"')],
    "deleted record": lambda ls: ls[:3] + ls[4:],
    "deleted first record": lambda ls: ls[1:],
    "swapped pair": lambda ls: ls[:2] + [ls[3], ls[2]] + ls[4:],
    "truncated tail": lambda ls: ls[:-1] + [ls[-1][: len(ls[-1]) // 2]],
    "inserted record": lambda ls: ls[:2] + [ls[1]] + ls[2:],
}


@pytest.mark.parametrize("kind", TAMPERING)
def test_verify_detects_tampering(tmp_path, capsys, kind):
    path = _file_with_records(tmp_path)
    path.write_text("".join(TAMPERING[kind](_lines(path))))
    code, out = _verify(path, capsys)
    assert code == 1 and "FAIL" in out, out


def test_four_threads_and_two_trails_append_one_intact_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    trails = [_trail(path), _trail(path)]

    def work(t):
        for i in range(25):
            trails[t % 2].emit(f"t{t}-{i}", {"outcome": "ok"})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = verify_audit_file(path)
    assert result.ok and result.records == 100, result.problems[:3]


def test_every_sink_gets_every_record_even_when_one_fails(tmp_path):
    got = []

    def broken(record):
        raise RuntimeError("sink down")

    path = tmp_path / "audit.jsonl"
    trail = _trail(path, extra=[broken, got.append])
    with pytest.raises(AuditWriteError, match="sink down"):
        trail.emit("r", {"outcome": "ok"})
    assert len(_lines(path)) == 1 and [r["request_id"] for r in got] == ["r"]


def test_an_audit_path_that_is_a_fifo_fails_at_once_instead_of_hanging(tmp_path):
    fifo = tmp_path / "audit.jsonl"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(AuditWriteError):
        _trail(fifo).emit("r", {"outcome": "ok"})
    assert time.perf_counter() - start < 2.0


def test_a_failing_sink_under_closed_voids_the_record_and_fails_the_call(
    pipe, write_policy, audit_records, monkeypatch
):
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)

    calls = []

    def flaky(record):  # takes the start record, fails on the generation record
        calls.append(record["event"])
        if record["event"] == "saferedir.generation":
            raise RuntimeError("sink down")

    guard.audit = _trail(guard.audit.file, extra=[flaky])
    with pytest.raises(EnforcementError, match="audit record could not be written"):
        generate(pipe)
    events = [r["event"] for r in audit_records(None)]
    assert events == ["saferedir.call_started", "saferedir.generation", "saferedir.voided"]


def test_records_a_sink_lost_under_open_are_named_in_the_next_record(pipe, write_policy, audit_records):
    guard = SafeRedirGuard.from_policy(write_policy(fail_mode="open"))
    guard.wrap(pipe)
    state = {"fail": True}

    def flaky(record):
        if state["fail"] and record["event"] == "saferedir.generation":
            raise RuntimeError("sink down")

    guard.audit = _trail(guard.audit.file, extra=[flaky])
    with pytest.warns(UserWarning, match="was not written"):
        generate(pipe)
    state["fail"] = False
    generate(pipe)
    first, second = audit_records()
    lost = [f for f in second["fail_open"] if f["reason"].startswith("audit:")]
    assert len(lost) == 1 and first["request_id"] in lost[0]["reason"]


def test_a_killed_call_leaves_its_start_record_and_verify_lists_it(tmp_path, capsys):
    path = _file_with_records(tmp_path, 2)
    _trail(path).emit_event("saferedir.call_started", "killed-mid-call", {"batch_size": 2})
    code, out = _verify(path, capsys)
    assert code == 0 and "1 call(s) started without a completion record: ['killed-mid-call']" in out


def test_hmac_prompt_hashes_need_a_key_and_are_keyed(
    pipe, write_policy, audit_records, tmp_path, monkeypatch
):
    audit = {"sinks": ["file"], "file": str(tmp_path / "audit.jsonl"), "prompt_logging": "hmac-sha256"}
    monkeypatch.delenv("SAFEREDIR_PROMPT_KEY", raising=False)
    with pytest.raises(GuardBuildError, match="SAFEREDIR_PROMPT_KEY"):
        SafeRedirGuard.from_policy(write_policy(audit=audit))
    key = "k" * 32
    monkeypatch.setenv("SAFEREDIR_PROMPT_KEY", key)
    guard = SafeRedirGuard.from_policy(write_policy(audit=audit))
    guard.wrap(pipe)
    generate(pipe)
    (record,) = audit_records()
    expected = hmac.new(key.encode(), FORGET.encode(), hashlib.sha256).hexdigest()
    assert record["samples"][0]["prompt"] == "hmac-sha256:" + expected
    assert hashlib.sha256(FORGET.encode()).hexdigest() not in json.dumps(record)


@pytest.mark.parametrize("mode", ["sha256", "none", "hmac-sha256"])
def test_error_messages_never_carry_prompt_text_unless_logged_in_full(
    pipe, write_policy, audit_records, tmp_path, monkeypatch, mode
):
    monkeypatch.setenv("SAFEREDIR_PROMPT_KEY", "k" * 32)
    audit = {"sinks": ["file"], "file": str(tmp_path / "audit.jsonl"), "prompt_logging": mode}
    guard = SafeRedirGuard.from_policy(write_policy(audit=audit))
    guard.wrap(pipe)
    with pytest.raises(ValueError) as info:
        generate(pipe, negative_prompt=["one"])  # diffusers' message quotes the prompts
    assert FORGET in str(info.value), "the caller still gets the original message"
    raw = (tmp_path / "audit.jsonl").read_text()
    assert FORGET not in raw and RETAIN not in raw and "<prompt>" in raw


def test_demo_audit_goes_under_out_and_is_appended_to(tmp_path, write_policy):
    from saferedir_shapes.demo import _guard_auditing_into

    policy = write_policy()  # its own audit file: tmp_path/audit.jsonl
    (tmp_path / "audit.jsonl").write_text("earlier production records\n")
    out = tmp_path / "demo"
    out.mkdir()
    (out / "audit.jsonl").write_text('{"earlier": "demo run"}\n')
    guard = _guard_auditing_into(policy, out / "audit.jsonl")
    guard.audit.emit("r", {"outcome": "ok"})
    assert (tmp_path / "audit.jsonl").read_text() == "earlier production records\n"
    lines = (out / "audit.jsonl").read_text().splitlines()
    assert lines[0] == '{"earlier": "demo run"}' and json.loads(lines[1])["request_id"] == "r"
