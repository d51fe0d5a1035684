"""The audit trail: structured records of every guarded call, emitted through structlog, written
to a tamper-evident file, and verified by :func:`verify_audit_file` (``saferedir audit verify``).

Context that holds for every record of a guard (schema version, policy name and sha256) is bound
once; each record binds its request id and time. Sinks: JSON lines appended to a file, JSON on
standard output, and any callables plugins return from ``saferedir_audit_sinks``. Every sink gets
every record: one failing sink does not starve the others, and the failure is raised (as
:class:`~saferedir_sdk.errors.AuditWriteError`) only after all were tried.

Events (``schema_version`` 11; 10 had no ``max_deciding_score``, 9 had no ``shift``, 8 had no
``gates_opened``, 7 had no ``side_conditioning``, 6 had no ``unresolved`` and ``withheld``, 5 had no
``rehearsed_steps`` and ``rewound``, 4 did not say whether a later released trigger had moved a
sample, 3 did not name the bundles, 2 had no start records and no chain, 1 a flat fingerprint)::

    saferedir.call_started   before a guarded call generates: request_id, time, adapter,
                             batch_size, fail_mode (a call killed mid-way leaves this one alone;
                             ``verify`` lists such calls)
    saferedir.generation     after it: the call's record (below)
    saferedir.voided         a generation record that some sink could not write: the call failed
                             (fail_mode closed), whatever that record said; request_id, reason
    saferedir.unattributed   fail_mode open only: a guarded denoiser ran outside a guarded call

    common           event, schema_version, time (ISO 8601, UTC), request_id (32 hex),
                     policy {"name", "sha256"}
    bundles          [{"concept", "sha256", "file", "source"}] per enforced concept, the bundle that
                     enforced it and where it came from: "file" (a path in the policy) or
                     "plugin NAME (DIST VERSION)" / "plugin NAME (registered in code)"
    backbone_mismatch  [{"concept", "encoder", "bundle", "pipeline"}]: concepts enforced by a bundle
                     trained for other text-encoder weights (rule ``encoder_mismatch: warn``)
    components       {"unet": sha256, "text_encoder": sha256, ...}: the weights hash of each
                     module the call depended on, as the call ran it (taken at wrap; taken again
                     when a per-call probe sees its weights edited since): which variant served the request
    backbone         the pipeline's BackboneFingerprint: {"streams", "pooled_dim",
                     "latent_channels", "encoders": [{"name", "tokenizer_sha256",
                     "weights_sha256"}], "family"}
    adapter          {"adapter", "pipeline"}
    fail_mode        "closed" | "open"
    fail_open        [{"concept", "reason"}] what was not enforced (fail_mode open only)
    steps            denoising steps the guard saw (of the run whose images were returned)
    rehearsed_steps  with a ``rewind`` rule that flagged samples: the denoising steps of the call's
                     first run, where it decided (redone in the second); 0 otherwise
    cfg              whether classifier-free guidance batched an unconditional half
    side_conditioning  what the denoiser was conditioned on besides the prompt, which the
                     redirector cannot move ("added_cond_kwargs['image_embeds']": an IP-Adapter
                     image prompt; "cross_attention_kwargs['gligen']": GLIGEN grounding;
                     "class_labels": unCLIP's image embedding): withheld (zeros) from every
                     redirected sample at the steps its prompt was moved; [] when none
    samples          [{"index", "prompt_index", "prompt", "action",
                       "concepts": [{"concept", "category", "rule_action", "checks",
                                     "max_score", "triggered", "first_step", "escalation",
                                     "applied", "rewound", "unresolved", "withheld",
                                     "gates_opened", "max_deciding_score", "shift"}]}]
                     max_score: the highest p(unsafe) at any check; max_deciding_score: at a
                     check that could trigger (at or below the rule's ``decide_at_t``), null
                     where none ran: a high max_score with a low max_deciding_score is a
                     concept seen only where the rule does not decide;
                     unresolved: the redirection did not clear the concept (its last checks while
                     redirected still saw it); withheld: so the image was blocked (rule
                     ``unresolved: block``); gates_opened: under ``gates: yield``, the move
                     went through gates the heads had shut (the prompt's words did not show the
                     concept to the heads; the latent classifier's decision prevailed);
                     shift: a rule with a concept ``shift`` that moved the sample, the share of
                     each token state's norm it moved it by (scale x strength x escalation
                     reached), else null
    latency_ms       wall time of the call
    outcome          "ok" | "redirected" | "blocked" | "error"
    error            {"type", "message"} when outcome is "error", else null (prompt text is
                     scrubbed from the message unless prompt_logging is "full")

**The file is a hash chain.** Each line of the file sink also carries ``seq`` (0, 1, 2, ... per
file), ``prev`` (the previous line's ``hash``; 64 zeros for the first) and ``hash`` (sha256 of the
line's canonical JSON without ``hash``). The chain continues across processes and restarts: each
append reads the file's last record under an exclusive lock. A rewritten record no longer
matches its hash; a deleted, inserted or reordered one breaks ``seq`` and ``prev``; a cut tail is
an unterminated line. What a chain cannot show by itself is the loss of the newest records:
``verify`` prints the last ``seq`` and ``hash`` so they can be kept elsewhere (an anchor). Anyone
who can rewrite the whole file can also recompute a chain: keep the file on append-only storage
or ship its lines to another system (a plugin sink) where that matters.

**Prompts** appear as configured: ``none``; ``sha256`` (unsalted: a dictionary of likely prompts
reverses it); ``hmac-sha256`` (keyed with the secret in the environment variable
``audit.prompt_key_env`` or the file ``audit.prompt_key_file``: not reversible without the key, and
the same prompt still gives the same value under one key); ``full`` (raw text).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from .errors import AuditWriteError, GuardBuildError
from .policy import AuditSettings

AUDIT_SCHEMA_VERSION = 11
GENERATION_EVENT = "saferedir.generation"
START_EVENT = "saferedir.call_started"
VOIDED_EVENT = "saferedir.voided"
UNATTRIBUTED_EVENT = "saferedir.unattributed"
GENESIS = "0" * 64
CHAIN_FIELDS = ("seq", "prev", "hash")


def canonical_json(record: dict[str, Any]) -> str:
    """The one serialisation records are hashed and written in (sorted keys, no spaces, strict
    JSON: a NaN or infinity is an error, never a bare ``NaN`` in a file)."""
    return json.dumps(
        record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str
    )


def record_hash(record: dict[str, Any]) -> str:
    """sha256 of ``record``'s canonical JSON without its ``hash`` field."""
    return hashlib.sha256(
        canonical_json({k: v for k, v in record.items() if k != "hash"}).encode()
    ).hexdigest()


def prompt_key(settings: AuditSettings) -> bytes | None:
    """The HMAC key ``hmac-sha256`` prompt logging needs, from the environment variable or file the
    settings name; None for the other modes. Raises :class:`GuardBuildError` when it is missing."""
    if settings.prompt_logging != "hmac-sha256":
        return None
    if settings.prompt_key_file:
        try:
            key = Path(settings.prompt_key_file).read_bytes().strip()
        except OSError as exc:
            raise GuardBuildError(
                f"audit.prompt_key_file {settings.prompt_key_file}: cannot read the prompt key ({exc.strerror or exc})"
            ) from None
    else:
        key = os.environ.get(settings.prompt_key_env, "").encode()
    if len(key) < 16:
        where = (
            f"file {settings.prompt_key_file}" if settings.prompt_key_file else f"${settings.prompt_key_env}"
        )
        raise GuardBuildError(
            f"audit.prompt_logging is hmac-sha256 but the key in {where} is missing or shorter than 16 bytes"
        )
    return key


def render_prompt(prompt: str | None, mode: str, key: bytes | None = None) -> str | None:
    """A prompt as the policy's ``audit.prompt_logging`` allows it to appear in a record."""
    if prompt is None or mode == "none":
        return None
    if mode == "sha256":
        return "sha256:" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    if mode == "hmac-sha256":
        if key is None:
            raise ValueError("hmac-sha256 prompt logging needs a key")
        return "hmac-sha256:" + hmac.new(key, prompt.encode("utf-8"), hashlib.sha256).hexdigest()
    return prompt


def scrub(text: str, prompts: Sequence[str] | None) -> str:
    """``text`` with every prompt (as written, and as ``repr`` shows it) replaced by
    ``<prompt>``: error messages of the pipeline (diffusers quotes prompts in its ValueErrors) must
    not leak what prompt logging hides."""
    for prompt in sorted({p for p in prompts or () if p}, key=len, reverse=True):
        for form in (prompt, repr(prompt)[1:-1]):
            text = text.replace(form, "<prompt>")
    return text


# --- sinks -------------------------------------------------------------------------------------

_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


def _lock_for(path: Path) -> threading.Lock:
    key = str(path.resolve())
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(key, threading.Lock())


def _last_line(fd: int, size: int) -> bytes:
    """The file's last line (without its newline), read backwards in chunks."""
    end = size
    chunk = 1 << 16
    data = b""
    while end > 0:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start) + data
        end = start
        body = data[:-1] if data.endswith(b"\n") else data
        if b"\n" in body or end == 0:
            return body.rsplit(b"\n", 1)[-1]
    return b""


class _ChainedJsonLinesFile:
    """A structlog logger that appends each record to a JSON-lines file as a link of its hash chain.

    The file is opened per record without blocking (a FIFO or device is refused, not waited on),
    under an exclusive lock (threads: a lock per path; processes: ``flock``), and the new line is
    written with one ``write`` in append mode."""

    name = "file"

    def __init__(self, path: Path):
        self.path = path

    def msg(self, **event: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _lock_for(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    raise OSError(f"{self.path} is not a regular file")
                try:
                    import fcntl

                    fcntl.flock(fd, fcntl.LOCK_EX)
                except ImportError:  # (no flock on this platform: the thread lock still holds)
                    pass
                size = os.fstat(fd).st_size
                seq, prev, lead = 0, GENESIS, b""
                if size:
                    tail = _last_line(fd, size)
                    if os.pread(fd, 1, size - 1) != b"\n":
                        lead = b"\n"  # a cut line stays on its own (verify reports it)
                    try:
                        last = json.loads(tail)
                        seq, prev = int(last["seq"]) + 1, str(last["hash"])
                    except (ValueError, KeyError, TypeError):
                        seq, prev = 0, GENESIS  # unreadable tail: a new chain starts (verify says where)
                record = {**event, "seq": seq, "prev": prev}
                record["hash"] = record_hash(record)
                os.write(fd, lead + canonical_json(record).encode("utf-8") + b"\n")
            finally:
                os.close(fd)

    info = warning = error = msg


class _Stdout:
    name = "stdout"

    def msg(self, **event: Any) -> None:
        sys.stdout.write(canonical_json(event) + "\n")
        sys.stdout.flush()

    info = warning = error = msg


class _PluginSink:
    """A structlog logger handing each event dict (JSON-safe copy) to a plugin's callable."""

    def __init__(self, sink: Callable[[dict[str, Any]], None]):
        self.sink = sink
        self.name = f"plugin:{getattr(sink, '__qualname__', type(sink).__name__)}"

    def msg(self, **event: Any) -> None:
        self.sink(json.loads(canonical_json(event)))

    info = warning = error = msg


class AuditTrail:
    """Emits audit records to the sinks a policy names (plus plugin sinks)."""

    def __init__(
        self,
        settings: AuditSettings,
        *,
        policy_name: str,
        policy_sha256: str,
        extra_sinks: Sequence[Callable[[dict[str, Any]], None]] = (),
    ):
        self.settings = settings
        self.key = prompt_key(settings)
        self.file = Path(settings.file) if settings.file and "file" in settings.sinks else None
        outputs: list[Any] = []
        if self.file is not None:
            outputs.append(_ChainedJsonLinesFile(self.file))
        if "stdout" in settings.sinks:
            outputs.append(_Stdout())
        outputs += [_PluginSink(sink) for sink in extra_sinks]
        # every sink receives the event dict; each renders it itself (the chain is the file's own)
        self._loggers = [
            (
                out.name,
                structlog.wrap_logger(out, processors=[]).bind(
                    schema_version=AUDIT_SCHEMA_VERSION, policy={"name": policy_name, "sha256": policy_sha256}
                ),
            )
            for out in outputs
        ]

    def prompt(self, prompt: str | None) -> str | None:
        return render_prompt(prompt, self.settings.prompt_logging, self.key)

    def emit_event(
        self, event: str, request_id: str, record: dict[str, Any], *, skip: Sequence[str] = ()
    ) -> None:
        """Write one ``event`` record to every sink (except those named in ``skip``). Raises
        :class:`AuditWriteError` after trying all of them if any failed."""
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        failures: list[tuple[str, BaseException]] = []
        for name, logger in self._loggers:
            if name in skip:
                continue
            try:
                logger.bind(request_id=request_id, time=now).info(event, **record)
            except Exception as exc:
                failures.append((name, exc))
        if failures:
            raise AuditWriteError(failures)

    def emit(self, request_id: str, record: dict[str, Any]) -> None:
        """Write one generation record (``record`` holds the call-specific keys)."""
        self.emit_event(GENERATION_EVENT, request_id, record)


# --- verification ------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    """What :func:`verify_audit_file` found."""

    path: str
    records: int = 0
    problems: list[str] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)  # request ids started, never completed
    last_seq: int | None = None
    last_hash: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_audit_file(path: str | Path) -> VerifyResult:
    """Check an audit file's hash chain line by line: every line a JSON record, its ``hash`` its
    own, ``seq`` counting up from 0 by one, ``prev`` the previous line's hash, the last line
    terminated. Lists the calls that started and never completed (a killed process)."""
    path = Path(path)
    result = VerifyResult(str(path))
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        result.problems.append(f"line {len(lines)}: truncated (the file does not end with a complete record)")
    expected_seq, prev_hash = 0, GENESIS
    started: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not an object")
        except ValueError:
            if number < len(lines) or not result.problems:
                result.problems.append(f"line {number}: not a JSON record (altered or cut)")
            expected_seq, prev_hash = None, None  # the chain cannot be followed through it
            continue
        result.records += 1
        if any(k not in record for k in CHAIN_FIELDS):
            result.problems.append(f"line {number}: no chain fields (seq, prev, hash)")
            continue
        seq = record["seq"]
        if record_hash(record) != record["hash"]:
            result.problems.append(
                f"line {number} (seq {seq}): altered (its content does not match its hash)"
            )
        if expected_seq is not None and seq != expected_seq:
            if isinstance(seq, int) and seq > expected_seq:
                result.problems.append(
                    f"line {number}: record(s) missing before it (seq {expected_seq}..{seq - 1})"
                )
            else:
                result.problems.append(f"line {number}: out of order (seq {seq} after {expected_seq - 1})")
        elif prev_hash is not None and record["prev"] != prev_hash:
            result.problems.append(
                f"line {number} (seq {seq}): chain broken (prev is not the hash of the record before it)"
            )
        event, request = record.get("event"), record.get("request_id")
        if event == START_EVENT and isinstance(request, str):
            started[request] = number
        elif event in (GENERATION_EVENT, VOIDED_EVENT):
            started.pop(request, None)
        expected_seq = seq + 1 if isinstance(seq, int) else None
        prev_hash = record["hash"]
        result.last_seq, result.last_hash = seq, record["hash"]
    result.unfinished = sorted(started, key=started.__getitem__)
    return result
