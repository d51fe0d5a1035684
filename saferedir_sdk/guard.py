"""SafeRedirGuard: builds everything from a policy, wraps pipelines, enforces, audits.

>>> guard = SafeRedirGuard.from_policy("policies/corp.yaml")
>>> guard.wrap(pipe)                 # in place; returns pipe
>>> images = pipe(["a cat", "..."]).images
>>> guard.last_report.samples[1].action
'redirected'
>>> guard.unwrap(pipe)               # bit-identical to never having wrapped

How it reaches the model: a forward pre-hook on the pipeline's denoiser (found by the adapter)
sees every denoising call, so a decision acts in the step it is made. The pipeline's class is
swapped for a same-named subclass whose ``__call__`` opens a per-call context (request id,
engine state), so that every call gets exactly one audit record and ``block`` can act on the
finished images. ``unwrap`` removes the hook and restores the class.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from .adapter import Adapter, CallInfo
from .audit import AuditTrail
from .bundle import RedirectorBundle, load_bundle
from .engine import ConceptDecision, EngineConcept, EngineState, RedirectionEngine
from .errors import (
    BackboneMismatchError,
    EnforcementError,
    GenerationBlocked,
    GuardBuildError,
    PluginError,
    SafeRedirError,
)
from .fingerprint import BackboneFingerprint
from .plugins import default_plugin_manager, find_adapter, registered_concepts
from .policy import ConceptRule, EffectiveRule, LoadedPolicy, load_policy

_ACTION_RANK = {"none": 0, "monitored": 1, "redirected": 2, "blocked": 3}
_ACTION_OF_RULE = {"monitor": "monitored", "redirect": "redirected", "block": "blocked"}


# --- reports ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConceptReport:
    """One concept's outcome for one sample."""

    concept: str
    category: str
    rule_action: str
    checks: int
    max_score: float | None
    triggered: bool
    first_step: int | None


@dataclass(frozen=True)
class SampleReport:
    """What happened to one sample (image) of a call. ``action``: none|monitored|redirected|blocked."""

    index: int
    prompt_index: int
    prompt: str | None
    action: str
    concepts: list[ConceptReport]


@dataclass(frozen=True)
class CallReport:
    """The per-sample report of one guarded call; the same facts as its audit record."""

    request_id: str
    outcome: str
    samples: list[SampleReport]
    steps: int
    cfg: bool | None
    latency_ms: float
    fail_open: list[dict[str, str]]
    error: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- internals --------------------------------------------------------------------------------


@dataclass
class _ResolvedConcept:
    rule: EffectiveRule
    bundles: list[RedirectorBundle]


@dataclass
class _Wrapping:
    guard: SafeRedirGuard
    pipe: Any
    adapter: Adapter
    fingerprint: BackboneFingerprint
    engine: RedirectionEngine
    fail_open: list[dict[str, str]]
    original_class: type
    handle: Any = None


@dataclass
class _CallContext:
    wrapping: _Wrapping
    request_id: str
    state: EngineState | None = None
    steps: int = 0
    cfg: bool | None = None
    runtime_failures: list[dict[str, str]] = field(default_factory=list)


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
        {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__},
    )
    _GUARDED_CLASSES[cls] = guarded
    return guarded


# --- the guard --------------------------------------------------------------------------------


class SafeRedirGuard:
    """Enforces one policy on any number of wrapped pipelines."""

    def __init__(self, policy: LoadedPolicy, *, plugin_manager: pluggy.PluginManager | None = None):
        self.loaded_policy = policy
        self.policy = policy.policy
        self.plugin_manager = plugin_manager or default_plugin_manager()
        self._local = threading.local()
        self.fail_open: list[dict[str, str]] = []
        self._concepts: list[_ResolvedConcept] = []
        registry: dict[str, Any] | None = None
        for rule_cfg, rule in zip(self.policy.concepts, self.policy.effective_rules()):
            try:
                if rule_cfg.redirector.plugin is not None and registry is None:
                    registry = registered_concepts(self.plugin_manager)
                bundles = self._load_bundles(rule_cfg, registry)
            except SafeRedirError as exc:
                self.fail_open.append(self._cannot_enforce(rule.concept, exc, GuardBuildError))
                continue
            self._concepts.append(_ResolvedConcept(rule, bundles))
        sinks: list[Callable[[dict[str, Any]], None]] = [
            sink for batch in self.plugin_manager.hook.saferedir_audit_sinks(settings=self.policy.audit) for sink in batch or []
        ]
        self.audit = AuditTrail(
            self.policy.audit, policy_name=self.policy.name, policy_sha256=policy.sha256, extra_sinks=sinks
        )

    @classmethod
    def from_policy(cls, path: str | Path, *, plugin_manager: pluggy.PluginManager | None = None) -> SafeRedirGuard:
        """Load the policy file at ``path`` and every redirector it names.

        Raises:
            PolicyError: the file is missing or invalid.
            GuardBuildError: under ``fail_mode: closed``, a concept's redirector cannot be loaded
                (missing file, bad format, sha256 pin mismatch, unknown plugin concept).
        """
        return cls(load_policy(path), plugin_manager=plugin_manager)

    # -- construction helpers ------------------------------------------------------------------

    def _cannot_enforce(self, concept: str, exc: Exception, closed_error: type[SafeRedirError] | None) -> dict[str, str]:
        """Fail closed (raise) or return a fail_open entry, as the policy says."""
        if self.policy.fail_mode == "closed":
            if closed_error is None:
                raise exc
            raise closed_error(
                f"policy '{self.policy.name}' ({self.loaded_policy.path}): concept '{concept}' cannot be enforced "
                f"and fail_mode is closed: {exc}"
            ) from exc
        entry = {"concept": concept, "reason": f"{type(exc).__name__}: {exc}"}
        warnings.warn(f"saferedir: concept '{concept}' is NOT enforced (fail_mode: open): {exc}", stacklevel=3)
        return entry

    def _load_bundles(self, rule: ConceptRule, registry: dict[str, Any] | None) -> list[RedirectorBundle]:
        ref = rule.redirector
        if ref.path is not None:
            path = Path(ref.path)
            if not path.is_absolute():
                path = self.loaded_policy.folder / path
            return [load_bundle(path, sha256=ref.sha256)]
        assert registry is not None and ref.plugin is not None
        spec = registry.get(ref.plugin)
        if spec is None:
            raise PluginError(
                f"no installed plugin registers concept '{ref.plugin}' (registered: {sorted(registry) or 'none'})"
            )
        if not spec.bundles:
            raise PluginError(f"plugin concept '{ref.plugin}' ships no trained bundle yet")
        bundles = []
        for path in spec.bundles:
            bundle = load_bundle(path)
            if ref.sha256 is None or bundle.sha256 == ref.sha256:
                bundles.append(bundle)
        if not bundles:
            # re-raise the integrity error of the first file, naming it and both hashes
            load_bundle(spec.bundles[0], sha256=ref.sha256)
        return bundles

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
            raise GuardBuildError(f"this {type(pipe).__name__} is already wrapped by a guard; unwrap it first")
        adapter = find_adapter(self.plugin_manager, pipe)
        fingerprint = adapter.fingerprint(pipe)
        denoiser = adapter.denoiser(pipe)
        device = next(denoiser.parameters()).device
        engine_concepts: list[EngineConcept] = []
        fail_open: list[dict[str, str]] = []
        for resolved in self._concepts:
            match = next((b for b in resolved.bundles if b.backbone.first_difference(fingerprint) is None), None)
            if match is None:
                first = resolved.bundles[0]
                error = BackboneMismatchError(first.path or "<bundle>", *first.backbone.first_difference(fingerprint))
                fail_open.append(self._cannot_enforce(resolved.rule.concept, error, None))
                continue
            engine_concepts.append(EngineConcept(resolved.rule, match.redirector.to(device)))
        wrapping = _Wrapping(
            guard=self,
            pipe=pipe,
            adapter=adapter,
            fingerprint=fingerprint,
            engine=RedirectionEngine(engine_concepts),
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

    @property
    def last_report(self) -> CallReport | None:
        """The report of the last guarded call made by this thread (None before the first)."""
        return getattr(self._local, "last_report", None)

    @property
    def concepts(self) -> list[str]:
        """Concepts this guard enforces (those that failed open are not listed)."""
        return [c.rule.concept for c in self._concepts]

    # -- enforcement -----------------------------------------------------------------------------

    def _make_hook(self, wrapping: _Wrapping) -> Callable[..., Any]:
        def pre_hook(_module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
            ctx = _ACTIVE.get()
            if ctx is None or ctx.wrapping is not wrapping:
                return None
            ctx.steps += 1
            try:
                inputs = wrapping.adapter.split_denoiser_inputs(wrapping.pipe, args, kwargs)
                ctx.cfg = inputs.uncond is not None
                if ctx.state is None:
                    ctx.state = wrapping.engine.init_state(inputs.cond)
                cond, uncond, ctx.state = wrapping.engine.step(
                    inputs.latents, inputs.timestep, inputs.cond, ctx.state, inputs.uncond
                )
                return wrapping.adapter.merge_denoiser_inputs(wrapping.pipe, args, kwargs, cond, uncond)
            except Exception as exc:
                if self.policy.fail_mode == "closed":
                    raise EnforcementError(
                        f"request {ctx.request_id}: policy '{self.policy.name}' could not be enforced at denoiser "
                        f"call {ctx.steps - 1} and fail_mode is closed: {type(exc).__name__}: {exc}"
                    ) from exc
                if not ctx.runtime_failures:  # the first failure is recorded; later steps pass through too
                    warnings.warn(f"saferedir: policy NOT enforced for request {ctx.request_id} (fail_mode: open): {exc}",
                                  stacklevel=2)
                    ctx.runtime_failures.append(
                        {"concept": "*", "reason": f"from denoiser call {ctx.steps - 1}: {type(exc).__name__}: {exc}"})
                return None

        return pre_hook

    def _guarded_call(self, wrapping: _Wrapping, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        info = wrapping.adapter.call_info(wrapping.pipe, args, kwargs)
        ctx = _CallContext(wrapping=wrapping, request_id=uuid.uuid4().hex)
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

        report = self._report(wrapping, ctx, info, error, start)
        blocked = [s.index for s in report.samples if s.action == "blocked"]
        if error is None and blocked and self.policy.block.mode == "placeholder":
            output = wrapping.adapter.replace_samples(wrapping.pipe, output, blocked, tuple(self.policy.block.color), info)
        report = self._finish(report, start)
        self._local.last_report = report
        self._emit(wrapping, report)
        if error is not None:
            raise error
        if blocked and self.policy.block.mode == "raise":
            raise GenerationBlocked(report)
        return output

    def _report(
        self, wrapping: _Wrapping, ctx: _CallContext, info: CallInfo, error: BaseException | None, start: float
    ) -> CallReport:
        rules = {c.rule.concept: c.rule for c in wrapping.engine.concepts}
        if ctx.state is not None:
            decisions = wrapping.engine.decisions(ctx.state)
        else:
            n = len(info.prompts) * info.num_images_per_prompt if info.prompts is not None else 0
            decisions = [
                [ConceptDecision(c.name, 0, None, False, None) for c in wrapping.engine.concepts] for _ in range(n)
            ]
        samples = []
        for index, row in enumerate(decisions):
            prompt_index = index // max(1, info.num_images_per_prompt)
            prompt = None
            if info.prompts is not None and prompt_index < len(info.prompts):
                prompt = self.audit.prompt(info.prompts[prompt_index])
            concepts = [
                ConceptReport(
                    concept=d.concept,
                    category=rules[d.concept].category,
                    rule_action=rules[d.concept].action,
                    checks=d.checks,
                    max_score=d.max_score,
                    triggered=d.triggered,
                    first_step=d.first_step,
                )
                for d in row
            ]
            action = max(
                (_ACTION_OF_RULE[c.rule_action] for c in concepts if c.triggered), key=_ACTION_RANK.__getitem__, default="none"
            )
            samples.append(SampleReport(index, prompt_index, prompt, action, concepts))
        if error is not None:
            outcome = "error"
        elif any(s.action == "blocked" for s in samples):
            outcome = "blocked"
        elif any(s.action == "redirected" for s in samples):
            outcome = "redirected"
        else:
            outcome = "ok"
        return CallReport(
            request_id=ctx.request_id,
            outcome=outcome,
            samples=samples,
            steps=ctx.steps,
            cfg=ctx.cfg,
            latency_ms=0.0,
            fail_open=[*self.fail_open, *wrapping.fail_open, *ctx.runtime_failures],
            error={"type": type(error).__name__, "message": str(error)} if error is not None else None,
        )

    @staticmethod
    def _finish(report: CallReport, start: float) -> CallReport:
        latency = round((time.perf_counter() - start) * 1000.0, 3)
        return CallReport(**{**report.__dict__, "latency_ms": latency})

    def _emit(self, wrapping: _Wrapping, report: CallReport) -> None:
        record = report.to_dict()
        request_id = record.pop("request_id")
        record.update(
            backbone=wrapping.fingerprint.to_dict(),
            adapter=wrapping.adapter.describe(wrapping.pipe),
            fail_mode=self.policy.fail_mode,
        )
        try:
            self.audit.emit(request_id, record)
        except Exception as exc:
            if self.policy.fail_mode == "closed":
                raise EnforcementError(
                    f"request {request_id}: the audit record could not be written and fail_mode is closed: {exc}"
                ) from exc
            warnings.warn(f"saferedir: audit record for request {request_id} was not written: {exc}", stacklevel=3)
