"""A pytest plugin for ``diffusers_transparency.py``: loaded into diffusers' own test run with
``-p transparency_plugin`` (this folder on ``PYTHONPATH``), it records a digest of every pipeline
call's output and, with ``SAFEREDIR_TRANSPARENCY=wrapped``, wraps every pipeline instance of the
instrumented classes in a never-firing guard as soon as its ``__init__`` returns.

The never-firing guard is a real guard (policy, bundle file, engine, hook, audit trail, ``closed``)
enforcing one concept whose redirector is built for the pipeline's own fingerprint with random
weights (seed 0) and a classifier bias of -100: its score is ~0 at every check, so it never
triggers. It is a harness, not a trained model: what is measured is whether the guard's presence
alone changes anything. One guard per backbone fingerprint; pipelines built from the same
components share it, as a user who wraps both would.

Environment: ``SAFEREDIR_TRANSPARENCY`` (``plain`` | ``wrapped``), ``SAFEREDIR_TRANSPARENCY_OUT``
(a JSON-lines file this plugin appends to), ``SAFEREDIR_TRANSPARENCY_WORK`` (bundles, policies,
the audit file), ``SAFEREDIR_TRANSPARENCY_THREADS`` (torch threads), ``SAFEREDIR_TRANSPARENCY_CLASSES``
(comma-separated diffusers class names to instrument).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

MODE = os.environ.get("SAFEREDIR_TRANSPARENCY", "plain")
OUT = Path(os.environ.get("SAFEREDIR_TRANSPARENCY_OUT", "transparency.jsonl"))
WORK = Path(os.environ.get("SAFEREDIR_TRANSPARENCY_WORK", "transparency-work"))
THREADS = int(os.environ.get("SAFEREDIR_TRANSPARENCY_THREADS", "2"))
CLASSES = [c for c in os.environ.get("SAFEREDIR_TRANSPARENCY_CLASSES", "").split(",") if c]
AUDIT = WORK / "audit.jsonl"

_state: dict[str, Any] = {"test": None, "index": 0, "guarded_calls": 0, "audit_lines": 0}
_local = threading.local()
_guards: dict[str, Any] = {}


def digest(value: Any) -> str:
    """sha256 over everything a pipeline output holds (arrays by dtype, shape and bytes)."""
    h = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            h.update(f"tensor{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
        elif isinstance(v, np.ndarray):
            h.update(f"array{v.dtype}{v.shape}".encode())
            h.update(np.ascontiguousarray(v).tobytes())
        elif hasattr(v, "tobytes") and hasattr(v, "mode"):  # PIL image
            h.update(f"pil{v.mode}{v.size}".encode())
            h.update(v.tobytes())
        elif isinstance(v, dict):
            for k in sorted(v, key=str):
                h.update(repr(k).encode())
                feed(v[k])
        elif isinstance(v, list | tuple):
            h.update(f"seq{len(v)}".encode())
            for item in v:
                feed(item)
        elif hasattr(v, "to_tuple"):  # diffusers BaseOutput
            feed(dict(v.items()))
        else:
            h.update(repr(v).encode())

    feed(value)
    return h.hexdigest()[:16]


def _write(record: dict[str, Any]) -> None:
    with OUT.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _audit_lines() -> int:
    if not AUDIT.exists():
        return 0
    return sum(1 for line in AUDIT.read_text().splitlines() if '"saferedir.generation"' in line)


def _recording(call: Any) -> Any:
    """``call`` (a ``__call__``) recording the digest of what the outermost call returns."""

    @functools.wraps(call)
    def recorded(self: Any, *args: Any, **kwargs: Any) -> Any:
        depth = getattr(_local, "depth", 0)
        if depth:
            return call(self, *args, **kwargs)
        _local.depth = 1
        index = _state["index"]
        _state["index"] += 1
        wrapped = "_saferedir_wrapping" in self.__dict__
        _state["guarded_calls"] += wrapped
        entry = {"kind": "call", "test": _state["test"], "index": index, "class": type(self).__name__}
        entry["wrapped"] = wrapped
        try:
            out = call(self, *args, **kwargs)
        except BaseException as exc:
            _write({**entry, "digest": f"raised {type(exc).__name__}: {str(exc)[:200]}"})
            raise
        finally:
            _local.depth = 0
        _write({**entry, "digest": digest(out)})
        return out

    return recorded


def _guard_for(pipe: Any) -> Any:
    """The never-firing guard for ``pipe``'s backbone fingerprint (built once, then shared)."""
    from saferedir_adapters.tiny import TINY_CAPACITY

    from saferedir_sdk import ConceptInfo, SafeRedirGuard, save_bundle
    from saferedir_sdk.plugins import default_plugin_manager, find_adapter
    from saferedir_sdk.redirector import Redirector, RedirectorConfig

    pm = default_plugin_manager()
    fingerprint = find_adapter(pm, pipe).fingerprint()
    key = hashlib.sha256(json.dumps(fingerprint.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    if key not in _guards:
        WORK.mkdir(parents=True, exist_ok=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            redirector = Redirector(RedirectorConfig.for_backbone(fingerprint, TINY_CAPACITY))
        with torch.no_grad():
            redirector.classifier[-1].bias.fill_(-100.0)
        bundle = WORK / f"never-{key}.safetensors"
        save_bundle(
            bundle, redirector, ConceptInfo("never", "custom"), fingerprint, {"harness": "never-firing"}
        )
        policy = WORK / f"never-{key}.yaml"
        policy.write_text(
            json.dumps(
                {
                    "version": 1,
                    "name": f"never-{key}",
                    "fail_mode": "closed",
                    "audit": {"sinks": ["file"], "file": str(AUDIT)},
                    "concepts": [
                        {"concept": "never", "category": "custom", "redirector": {"path": str(bundle)}}
                    ],
                }
            )
        )
        _guards[key] = SafeRedirGuard.from_policy(policy, plugin_manager=pm)
    return _guards[key]


def _wrapping_init(cls: type, init: Any) -> Any:
    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self) is cls and "_saferedir_wrapping" not in self.__dict__:
            from saferedir_sdk.errors import AdapterNotFoundError

            try:
                guard = _guard_for(self)
            except AdapterNotFoundError as exc:  # e.g. built without text encoders: wrap() refuses it
                _write(
                    {
                        "kind": "unwrappable",
                        "test": _state["test"],
                        "class": cls.__name__,
                        "reason": str(exc)[:200],
                    }
                )
                return
            guard.wrap(self)
            guarded = type(self)
            if not guarded.__dict__.get("_transparency_recorded"):
                guarded.__call__ = _recording(guarded.__dict__["__call__"])
                guarded._transparency_recorded = True

    return __init__


def pytest_configure(config: Any) -> None:
    torch.set_num_threads(THREADS)
    import diffusers

    for name in CLASSES:
        cls = getattr(diffusers, name)
        cls.__call__ = _recording(cls.__dict__["__call__"])
        if MODE == "wrapped":
            cls.__init__ = _wrapping_init(cls, cls.__dict__["__init__"])


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _state.update(test=nodeid, index=0, guarded_calls=0, audit_lines=_audit_lines())


def pytest_runtest_logreport(report: Any) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _write({"kind": "outcome", "test": report.nodeid, "outcome": report.outcome})


def pytest_runtest_teardown(item: Any) -> None:
    records = _audit_lines() - _state["audit_lines"]
    _write(
        {"kind": "audit", "test": item.nodeid, "guarded_calls": _state["guarded_calls"], "records": records}
    )
