"""SafeRedirGuard: builds everything from a policy, wraps pipelines, enforces, audits.

>>> guard = SafeRedirGuard.from_policy("shapes:demo")
>>> guard.wrap(pipe)                 # in place; returns pipe
>>> images = pipe(["a cat", "..."]).images
>>> guard.last_report.samples[1].action
'redirected'
>>> guard.unwrap(pipe)               # bit-identical to never having wrapped

How it reaches the model: a forward pre-hook on the pipeline's denoiser (found by the adapter)
sees every denoising call, so a decision acts in the step it is made. The pipeline's class is
swapped for a same-named subclass whose ``__call__`` opens a per-call context (request id, the
call's facts, engine state), so that every call gets exactly one audit record and ``block`` can
act on the finished images. ``unwrap`` removes the hook and restores the class.

This module orchestrates; :mod:`.resolve` turns the policy into enforced concepts and
:mod:`.report` builds the report.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pluggy

from ..adapter import Adapter, CallInfo
from ..audit import AuditTrail
from ..engine import EngineState, RedirectionEngine
from ..errors import EnforcementError, GenerationBlocked, GuardBuildError
from ..fingerprint import BackboneFingerprint
from ..plugins import default_plugin_manager, find_adapter, resolve_policy_ref
from ..policy import LoadedPolicy, load_policy
from .report import CallReport, build_report
from .resolve import FailOpen, match_backbone, resolve_policy


@dataclass
class _Wrapping:
    guard: SafeRedirGuard
    pipe: Any
    adapter: Adapter
    fingerprint: BackboneFingerprint
    engine: RedirectionEngine
    fail_open: list[FailOpen]
    original_class: type
    handle: Any = None


@dataclass
class _CallContext:
    wrapping: _Wrapping
    request_id: str
    info: CallInfo
    state: EngineState | None = None
    steps: int = 0
    cfg: bool | None = None
    runtime_failures: list[FailOpen] = field(default_factory=list)


_ACTIVE: ContextVar[_CallContext | None] = ContextVar("saferedir_active_call", default=None)
_GUARDED_CLASSES: dict[type, type] = {}
_WRAPPING_ATTR = "_saferedir_wrapping"


def _guarded_class(cls: type) -> type:
    """A subclass of ``cls`` with the same name whose ``__call__`` runs inside a guard context."""
    if cls in _GUARDED_CLASSES:
        return _GUARDED_CLASSES[cls]

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        wrapping: _Wrapping = self.__dict__[_WRAPPING_ATTR]
        return wrapping.guard._guarded_call(wrapping, super(guarded, self).__call__, args, kwargs)

    guarded = type(
        cls.__name__,
        (cls,),
        {
            "__call__": __call__,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        },
    )
    _GUARDED_CLASSES[cls] = guarded
    return guarded


class SafeRedirGuard:
    """Enforces one policy on any number of wrapped pipelines."""

    def __init__(self, policy: LoadedPolicy, *, plugin_manager: pluggy.PluginManager | None = None):
        self.loaded_policy = policy
        self.policy = policy.policy
        self.plugin_manager = plugin_manager or default_plugin_manager()
        self._local = threading.local()
        self._resolution = resolve_policy(policy, self.plugin_manager)
        self.fail_open: list[FailOpen] = self._resolution.fail_open
        sinks: list[Callable[[dict[str, Any]], None]] = [
            sink
            for batch in self.plugin_manager.hook.saferedir_audit_sinks(settings=self.policy.audit)
            for sink in batch or []
        ]
        self.audit = AuditTrail(
            self.policy.audit, policy_name=self.policy.name, policy_sha256=policy.sha256, extra_sinks=sinks
        )

    @classmethod
    def from_policy(
        cls, ref: str | Path, *, plugin_manager: pluggy.PluginManager | None = None
    ) -> SafeRedirGuard:
        """Load a policy and every redirector it names.

        ``ref``: a policy file, or a policy a plugin ships, as ``PACK:NAME`` (``"shapes:demo"``;
        ``saferedir plugins`` lists them).

        Raises:
            PolicyError: the file is missing or invalid, or no plugin ships ``PACK:NAME``.
            GuardBuildError: under ``fail_mode: closed``, a concept's redirector cannot be loaded
                (missing file, bad format, sha256 pin mismatch, unknown plugin concept).
        """
        pm = plugin_manager or default_plugin_manager()
        return cls(load_policy(resolve_policy_ref(pm, ref)), plugin_manager=pm)

    @property
    def concepts(self) -> list[str]:
        """Concepts this guard enforces (those that failed open are not listed)."""
        return [c.rule.concept for c in self._resolution.concepts]

    @property
    def last_report(self) -> CallReport | None:
        """The report of the last guarded call made by this thread (None before the first)."""
        return getattr(self._local, "last_report", None)

    # -- wrapping --------------------------------------------------------------------------------

    def wrap(self, pipe: Any) -> Any:
        """Guard ``pipe`` in place (and return it). Every call of ``pipe(...)`` is then enforced and
        audited.

        Raises:
            AdapterNotFoundError: no installed adapter knows this pipeline.
            BackboneMismatchError: under ``fail_mode: closed``, a redirector was trained for
                another backbone.
            GuardBuildError: ``pipe`` is already wrapped.
        """
        if _WRAPPING_ATTR in pipe.__dict__:
            raise GuardBuildError(
                f"this {type(pipe).__name__} is already wrapped by a guard; unwrap it first"
            )
        adapter = find_adapter(self.plugin_manager, pipe)
        fingerprint = adapter.fingerprint()
        denoiser = adapter.denoiser
        device = next(denoiser.parameters()).device
        enforced, fail_open = match_backbone(self.loaded_policy, self._resolution, fingerprint, device)
        wrapping = _Wrapping(
            guard=self,
            pipe=pipe,
            adapter=adapter,
            fingerprint=fingerprint,
            engine=RedirectionEngine(enforced),
            fail_open=fail_open,
            original_class=type(pipe),
        )
        wrapping.handle = denoiser.register_forward_pre_hook(self._make_hook(wrapping), with_kwargs=True)
        pipe.__dict__[_WRAPPING_ATTR] = wrapping
        pipe.__class__ = _guarded_class(type(pipe))
        return pipe

    def unwrap(self, pipe: Any) -> Any:
        """Remove this guard from ``pipe`` (hook and class); the pipeline behaves as never wrapped."""
        wrapping = pipe.__dict__.get(_WRAPPING_ATTR)
        if wrapping is None or wrapping.guard is not self:
            raise GuardBuildError(f"this {type(pipe).__name__} is not wrapped by this guard")
        wrapping.handle.remove()
        pipe.__class__ = wrapping.original_class
        del pipe.__dict__[_WRAPPING_ATTR]
        return pipe

    # -- enforcement -----------------------------------------------------------------------------

    def _make_hook(self, wrapping: _Wrapping) -> Callable[..., Any]:
        adapter, engine = wrapping.adapter, wrapping.engine

        def pre_hook(
            _module: Any, args: tuple, kwargs: dict[str, Any]
        ) -> tuple[tuple, dict[str, Any]] | None:
            ctx = _ACTIVE.get()
            if ctx is None or ctx.wrapping is not wrapping:
                return None
            try:
                inputs = adapter.split(args, kwargs, ctx.info.batch_size)
                if inputs.cond is None:  # the unconditional call of a backbone that runs CFG halves apart
                    if ctx.state is None or inputs.uncond is None:
                        return None
                    return adapter.merge(
                        args, kwargs, replace(inputs, uncond=engine.uncond_only(inputs.uncond, ctx.state))
                    )
                ctx.steps += 1
                ctx.cfg = inputs.uncond is not None
                if ctx.state is None:
                    ctx.state = engine.init_state(inputs.cond)
                cond, uncond, ctx.state = engine.step(
                    inputs.latents, inputs.timestep, inputs.cond, ctx.state, inputs.uncond
                )
                return adapter.merge(args, kwargs, replace(inputs, cond=cond, uncond=uncond))
            except Exception as exc:
                return self._enforcement_failed(ctx, exc)

        return pre_hook

    def _enforcement_failed(self, ctx: _CallContext, exc: Exception) -> None:
        """Closed: raise :class:`EnforcementError` (the call fails, its record says error). Open: the
        denoiser runs unguarded; the first failure of the call is warned about and recorded."""
        if self.policy.fail_mode == "closed":
            raise EnforcementError(
                f"request {ctx.request_id}: policy '{self.policy.name}' could not be enforced at denoising "
                f"step {ctx.steps} and fail_mode is closed: {type(exc).__name__}: {exc}"
            ) from exc
        if not ctx.runtime_failures:  # later steps pass through too; one entry says so
            warnings.warn(
                f"saferedir: policy NOT enforced for request {ctx.request_id} (fail_mode: open): {exc}",
                stacklevel=3,
            )
            ctx.runtime_failures.append(
                {"concept": "*", "reason": f"from denoising step {ctx.steps}: {type(exc).__name__}: {exc}"}
            )
        return None

    def _guarded_call(
        self, wrapping: _Wrapping, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        info = wrapping.adapter.call_info(args, kwargs)
        ctx = _CallContext(wrapping=wrapping, request_id=uuid.uuid4().hex, info=info)
        token = _ACTIVE.set(ctx)
        start = time.perf_counter()
        output: Any = None
        error: BaseException | None = None
        try:
            output = call(*args, **kwargs)
        except BaseException as exc:  # recorded, then re-raised unchanged
            error = exc
        finally:
            _ACTIVE.reset(token)

        decisions = wrapping.engine.decisions(ctx.state) if ctx.state is not None else None
        report = build_report(
            request_id=ctx.request_id,
            decisions=decisions,
            rules=[c.rule for c in wrapping.engine.concepts],
            prompts=info.prompts,
            num_images_per_prompt=info.num_images_per_prompt,
            batch_size=info.batch_size,
            steps=ctx.steps,
            cfg=ctx.cfg,
            fail_open=[*self.fail_open, *wrapping.fail_open, *ctx.runtime_failures],
            error=error,
            latency_ms=0.0,
            render_prompt=self.audit.prompt,
        )
        if error is None and report.blocked and self.policy.block.mode == "placeholder":
            output = wrapping.adapter.replace_samples(
                output, report.blocked, tuple(self.policy.block.color), info
            )
        report = replace(report, latency_ms=round((time.perf_counter() - start) * 1000.0, 3))
        self._local.last_report = report
        self._emit(wrapping, report)
        if error is not None:
            raise error
        if report.blocked and self.policy.block.mode == "raise":
            raise GenerationBlocked(report)
        return output

    def _emit(self, wrapping: _Wrapping, report: CallReport) -> None:
        record = report.to_dict()
        request_id = record.pop("request_id")
        record.update(
            backbone=wrapping.fingerprint.to_dict(),
            adapter=wrapping.adapter.describe(),
            fail_mode=self.policy.fail_mode,
        )
        try:
            self.audit.emit(request_id, record)
        except Exception as exc:
            if self.policy.fail_mode == "closed":
                raise EnforcementError(
                    f"request {request_id}: the audit record could not be written and fail_mode is closed: {exc}"
                ) from exc
            warnings.warn(
                f"saferedir: audit record for request {request_id} was not written: {exc}", stacklevel=3
            )
