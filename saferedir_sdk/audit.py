"""The audit trail: one structured record per guarded call, emitted through structlog.

Context that holds for every record of a guard (schema version, policy name and sha256) is bound
once; each call binds its request id. Rendering to JSON is the last processor, never mixed into
the code that decides. Sinks: JSON lines appended to a file, JSON on standard output, and any
callables plugins return from ``saferedir_audit_sinks``.

Record schema (``schema_version`` 2; version 1 had a flat backbone fingerprint)::

    event            "saferedir.generation"
    schema_version   2
    time             ISO 8601, UTC
    request_id       32 hex chars, also in the caller's CallReport
    policy           {"name", "sha256"}
    backbone         the pipeline's BackboneFingerprint: {"streams", "pooled_dim",
                     "latent_channels", "encoders": [{"name", "tokenizer_sha256",
                     "weights_sha256"}], "family"}
    adapter          {"adapter", "pipeline"}
    fail_mode        "closed" | "open"
    fail_open        [{"concept", "reason"}] concepts not enforced (fail_mode open only)
    steps            denoising steps the guard saw
    cfg              whether classifier-free guidance batched an unconditional half
    samples          [{"index", "prompt_index", "prompt", "action",
                       "concepts": [{"concept", "category", "rule_action", "checks",
                                     "max_score", "triggered", "first_step"}]}]
    latency_ms       wall time of the call
    outcome          "ok" | "redirected" | "blocked" | "error"
    error            {"type", "message"} when outcome is "error", else null
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from .policy import AuditSettings

AUDIT_SCHEMA_VERSION = 2
GENERATION_EVENT = "saferedir.generation"


def render_prompt(prompt: str | None, mode: str) -> str | None:
    """A prompt as the policy's ``audit.prompt_logging`` allows it to appear in a record."""
    if prompt is None or mode == "none":
        return None
    if mode == "sha256":
        return "sha256:" + hashlib.sha256(prompt.encode("utf-8")).hexdigest()
    return prompt


class _JsonLinesFile:
    """A structlog logger that appends each rendered line to a file (opened per record, so the
    file can be rotated underneath and no handle outlives the call)."""

    def __init__(self, path: Path):
        self.path = path

    def msg(self, message: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(message + "\n")

    info = warning = error = msg


class _Stdout:
    def msg(self, message: str) -> None:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()

    info = warning = error = msg


class _PluginSink:
    """A structlog logger handing each event dict (JSON-safe copy) to a plugin's callable."""

    def __init__(self, sink: Callable[[dict[str, Any]], None]):
        self.sink = sink

    def msg(self, **event: Any) -> None:
        self.sink(json.loads(json.dumps(event, default=str)))

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
        self.file = Path(settings.file) if settings.file and "file" in settings.sinks else None
        outputs: list[Any] = []
        if self.file is not None:
            outputs.append(_JsonLinesFile(self.file))
        if "stdout" in settings.sinks:
            outputs.append(_Stdout())
        render = structlog.processors.JSONRenderer(sort_keys=True, default=str)
        loggers = [structlog.wrap_logger(out, processors=[render]) for out in outputs]
        loggers += [structlog.wrap_logger(_PluginSink(sink), processors=[]) for sink in extra_sinks]
        self._loggers = [
            logger.bind(
                schema_version=AUDIT_SCHEMA_VERSION, policy={"name": policy_name, "sha256": policy_sha256}
            )
            for logger in loggers
        ]

    def prompt(self, prompt: str | None) -> str | None:
        return render_prompt(prompt, self.settings.prompt_logging)

    def emit(self, request_id: str, record: dict[str, Any]) -> None:
        """Write one generation record (``record`` holds the call-specific keys)."""
        now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        for logger in self._loggers:
            logger.bind(request_id=request_id, time=now).info(GENERATION_EVENT, **record)
