"""SafeRedirGuard: builds everything from a policy, wraps pipelines, enforces, audits.

>>> guard = SafeRedirGuard.from_policy("shapes:demo")
>>> guard.wrap(pipe)                 # in place; returns pipe
>>> images = pipe(["a cat", "..."]).images
>>> guard.last_report.samples[1].action
'redirected'
>>> guard.unwrap(pipe)               # bit-identical to never having wrapped

How it reaches the model: a forward pre-hook on the pipeline's denoiser (found by the adapter)
sees every denoising call, so a decision acts in the step it is made. Modules that read the prompt
before the denoiser in a step (a ControlNet: :meth:`Adapter.conditioned_modules`) are hooked the
same way: the step decides at the first of its calls, and they and the denoiser all receive that
step's redirected conditioning (a ControlNet's residuals never carry the original prompt). The
pipeline's class is swapped for a same-named subclass whose ``__call__`` opens a per-call context
(request id, the call's facts, engine state), so that every call gets exactly one audit record and
``block`` can act on the finished images. ``unwrap`` removes the hooks and restores the class.

With a ``rewind`` rule a call may run twice (:meth:`SafeRedirGuard._run`): first with those rules
only deciding, on the trajectory the unguarded model takes; if they flag samples, again from the
same starting noise (every ``torch.Generator`` among the call's arguments and the global RNG
states restored) with the flagged samples redirected from the first check on. The first run stops
early once every sample is flagged. The caller's step callbacks see both runs, but not the first
run's latents of a sample once it is flagged (zeros in their place, as for ``block``): the
unredirected image goes on forming there for its batch mates' sake, and a preview must not show it.

This module orchestrates; :mod:`.resolve` turns the policy into enforced concepts and
:mod:`.report` builds the report.
"""

from __future__ import annotations

import functools
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
import torch

from ..adapter import Adapter, CallInfo
from ..audit import START_EVENT, UNATTRIBUTED_EVENT, VOIDED_EVENT, AuditTrail, scrub
from ..engine import EngineState, RedirectionEngine
from ..errors import AuditWriteError, EnforcementError, GenerationBlocked, GuardBuildError
from ..fingerprint import BackboneFingerprint, WeightsProbe, module_sha256, unwrap_compiled
from ..plugins import find_adapter, policy_plugin_manager, resolve_policy_ref
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
    bundles: list[dict[str, str]]  # per enforced concept: sha256, file, source (in every record)
    mismatches: list[dict[str, str]]  # bundles enforcing despite other encoder weights (in every record)
    component_hashes: dict[str, str]  # module_sha256 of the hooked modules (at wrap; updated per call)
    probes: dict[str, WeightsProbe]  # what the hashes were last checked against (per call: cheap)
    original_class: type
    components: dict[str, Any] = field(default_factory=dict)  # what wrap saw, checked per call
    tokenizers: dict[str, tuple[Any, int]] = field(default_factory=dict)  # (tokenizer, len) wrap saw
    handles: list[Any] = field(default_factory=list)  # the forward pre-hooks wrap registered
    in_flight: int = 0  # guarded calls running now (guarded by the guard's lock)
    active: bool = True


@dataclass
class _CallContext:
    wrapping: _Wrapping
    request_id: str
    info: CallInfo
    state: EngineState | None = None
    steps: int = 0
    cfg: bool | None = None
    runtime_failures: list[FailOpen] = field(default_factory=list)
    rehearsal: bool = False  # the first run of a call with rewind rules: they only decide
    flagged: torch.Tensor | None = None  # (B, K) what the first run flagged: stuck from step 0 in the second
    rehearsed: list[list[Any]] | None = None  # the first run's decisions, when a second ran
    rehearsed_steps: int = 0
    # the step a conditioned module (ControlNet) already ran: (its original cond, its original
    # uncond, the redirected cond, the redirected uncond), for the denoiser call of the same step
    pending: tuple[Any, Any, Any, Any] | None = None
    # conditioning beside the prompt the call's denoiser received (Adapter.side_conditioning),
    # withheld from the rows whose prompt moved
    side_conditioning: list[str] = field(default_factory=list)
    components: dict[str, str] | None = None  # module_sha256 of the hooked modules this call ran


class _Settled(BaseException):
    """Raised from the hook to end a first run early: every sample is flagged (not an error; a
    BaseException so that no ``except Exception`` of a pipeline or callback swallows it)."""


class _RngSnapshot:
    """The random states a diffusers call draws from: every ``torch.Generator`` among its arguments
    (also inside a list) and the global CPU and CUDA generators; :meth:`restore` sets them back."""

    def __init__(self, args: tuple, kwargs: dict[str, Any]):
        found: list[torch.Generator] = []
        for value in (*args, *kwargs.values()):
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, torch.Generator) and all(item is not g for g in found):
                    found.append(item)
        self.generators = [(g, g.get_state()) for g in found]
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        for generator, state in self.generators:
            generator.set_state(state)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _merged(first: list[list[Any]], second: list[list[Any]]) -> list[list[Any]]:
    """The decisions of a call that ran twice: the second run's, where the first flagged a sample
    (``rewound``) with when it decided (first step) and the higher score; checks of both runs."""
    rows = []
    for a_row, b_row in zip(first, second):
        row = []
        for a, b in zip(a_row, b_row):
            merged = replace(
                b,
                checks=a.checks + b.checks,
                nonfinite=a.nonfinite or b.nonfinite,
                deciding_checks=max(a.deciding_checks, b.deciding_checks),
            )
            if b.rewound:
                merged = replace(
                    merged,
                    first_step=a.first_step,
                    max_score=_highest(a.max_score, b.max_score),
                    max_deciding_score=_highest(a.max_deciding_score, b.max_deciding_score),
                )
            row.append(merged)
        rows.append(row)
    return rows


def _highest(a: float | None, b: float | None) -> float | None:
    """The higher of two scores, either of which may be missing (None)."""
    scores = [s for s in (a, b) if s is not None]
    return max(scores) if scores else None


_ACTIVE: ContextVar[_CallContext | None] = ContextVar("saferedir_active_call", default=None)
_GUARDED_CLASSES: dict[type, type] = {}
_WRAPPING_ATTR = "_saferedir_wrapping"


def _guarded_class(cls: type) -> type:
    """A subclass of ``cls`` with the same name whose ``__call__`` runs inside a guard context."""
    if cls in _GUARDED_CLASSES:
        return _GUARDED_CLASSES[cls]

    @functools.wraps(cls.__call__)  # the original's signature, docstring and name for help() and IDEs
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        wrapping: _Wrapping = self.__dict__[_WRAPPING_ATTR]
        return wrapping.guard._guarded_call(wrapping, super(guarded, self).__call__, args, kwargs)

    def _refuse_copy(self: Any, *_: Any) -> Any:
        # a copy would carry the original's wrapping, and its modules the hooks bound to it (or to
        # nothing, once the original is unwrapped): refuse instead of copying a half-guarded pipeline
        raise GuardBuildError(
            f"this {cls.__name__} is wrapped by a guard and cannot be copied or pickled: unwrap it "
            "(guard.unwrap(pipe)), copy it, then wrap the original and the copy each"
        )

    guarded = type(
        cls.__name__,
        (cls,),
        {
            "__call__": __call__,
            "__copy__": _refuse_copy,
            "__deepcopy__": _refuse_copy,
            "__reduce_ex__": _refuse_copy,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        },
    )
    _GUARDED_CLASSES[cls] = guarded
    return guarded


def _hooked(adapter: Adapter) -> dict[str, Any]:
    """The modules a wrap hooks, hashes and checks per call, by name: the adapter's components (the
    denoiser, the text encoders) and its conditioned modules (a ControlNet)."""
    return {**adapter.components(), **adapter.conditioned_modules()}


def _shares_enforcement(active: _Wrapping, mine: _Wrapping, module: Any) -> bool:
    """The running call belongs to another pipeline that the same guard wrapped and that shares this
    denoiser or ControlNet (``Img2ImgPipeline(**pipe.components)`` then ``guard.wrap`` on it too):
    that wrapping's hook on this module enforces the same policy, so this one stands aside."""
    hooked = (active.adapter.denoiser, *active.adapter.conditioned_modules().values())
    return active.guard is mine.guard and active.active and any(m is module for m in hooked)


def _same(seen: Any, now: Any) -> bool:
    """Two conditionings (or two Nones) are the same tensors: the same storage and layout, or equal."""
    if seen is None or now is None:
        return seen is None and now is None
    mine, theirs = seen.parts(), now.parts()
    return len(mine) == len(theirs) and all(
        a.shape == b.shape
        and (
            (a.data_ptr(), a.stride(), a.dtype) == (b.data_ptr(), b.stride(), b.dtype)
            or bool(torch.equal(a, b))  # a host read only where the pipeline copied the embeddings
        )
        for a, b in zip(mine, theirs)
    )


def _prompt_rows_moved(seen_cond: Any, seen_uncond: Any, cond: Any, uncond: Any) -> Any:
    """``uncond`` (the step's unconditional half, as redirected) with each sample whose unconditional
    row was bit for bit its conditional row (``seen_*``: what the call carried) given the redirected
    conditional row instead: that row is the prompt too. Perturbed-attention guidance without CFG
    batches the conditional rows twice, ``[cond; cond]``, which reads as ``[uncond; cond]``; without
    this the first copy, which the image is drawn from, would keep the original prompt. (A CFG call
    whose negative prompt is its prompt, or an empty prompt with an empty negative one, gets both
    halves moved: the redirected prediction without guidance amplifying the move.) No host read."""
    if seen_uncond is None or uncond is None:
        return uncond
    mine, theirs = seen_cond.parts(), seen_uncond.parts()
    if len(mine) != len(theirs) or len(cond.parts()) != len(uncond.parts()):
        return uncond
    if any(a.shape != b.shape for a, b in zip(mine, theirs)):
        return uncond
    return cond.where(~_rows_changed(seen_uncond, seen_cond), uncond)


def _rows_changed(seen: Any, now: Any) -> torch.Tensor:
    """(B,) bool: the samples whose conditioning ``now`` differs from ``seen`` (what the call
    carried) in any element of any part; a NaN counts as changed. No host read."""
    changed = [(a != b).flatten(1).any(dim=1) for a, b in zip(seen.parts(), now.parts())]
    return torch.stack(changed).any(dim=0)


class SafeRedirGuard:
    """Enforces one policy on any number of wrapped pipelines."""

    def __init__(self, policy: LoadedPolicy, *, plugin_manager: pluggy.PluginManager | None = None):
        self.loaded_policy = policy
        self.policy = policy.policy
        self.plugin_manager = policy_plugin_manager(policy, plugin_manager)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._unwritten: list[FailOpen] = []  # fail_mode open: records some sink lost, told in the next one
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
            PluginError: ``plugin_manager`` holds a plugin the policy's ``plugins.allow`` does not
                allow, or a plugin implements a hook no specification declares.
            GuardBuildError: under ``fail_mode: closed``, a concept's redirector cannot be loaded
                (missing file, bad format, sha256 pin mismatch, unknown plugin concept).
        """
        return cls(load_policy(resolve_policy_ref(plugin_manager, ref)), plugin_manager=plugin_manager)

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
        matched = match_backbone(
            self.loaded_policy, self._resolution, fingerprint, device, adapter.encode_prompts
        )
        hooked = _hooked(adapter)
        wrapping = _Wrapping(
            guard=self,
            pipe=pipe,
            adapter=adapter,
            fingerprint=fingerprint,
            engine=RedirectionEngine(matched.enforced),
            fail_open=matched.fail_open,
            bundles=matched.bundles,
            mismatches=matched.mismatches,
            component_hashes={name: module_sha256(m) for name, m in hooked.items()},
            probes={name: WeightsProbe.read(m) for name, m in hooked.items()},
            original_class=type(pipe),
            components=hooked,
            tokenizers={name: (tok, len(tok)) for name, tok in adapter.tokenizers().items()},
        )
        wrapping.handles = [
            module.register_forward_pre_hook(self._make_hook(wrapping, conditioned=name), with_kwargs=True)
            for name, module in [("", denoiser), *adapter.conditioned_modules().items()]
        ]
        pipe.__dict__[_WRAPPING_ATTR] = wrapping
        pipe.__class__ = _guarded_class(type(pipe))
        return pipe

    def unwrap(self, pipe: Any) -> Any:
        """Remove this guard from ``pipe`` (hook and class); the pipeline behaves as never wrapped.

        Raises:
            GuardBuildError: ``pipe`` is not wrapped by this guard, or a guarded call on it is still
                running (in another thread): enforcement is never dropped mid-call.
        """
        wrapping = pipe.__dict__.get(_WRAPPING_ATTR)
        if wrapping is None or wrapping.guard is not self:
            raise GuardBuildError(f"this {type(pipe).__name__} is not wrapped by this guard")
        with self._lock:
            if wrapping.in_flight:
                raise GuardBuildError(
                    f"cannot unwrap this {type(pipe).__name__}: {wrapping.in_flight} guarded call(s) still "
                    "running; unwrap after they return"
                )
            wrapping.active = False
        for handle in wrapping.handles:
            handle.remove()
        pipe.__class__ = wrapping.original_class
        del pipe.__dict__[_WRAPPING_ATTR]
        return pipe

    # -- enforcement -----------------------------------------------------------------------------

    def _make_hook(self, wrapping: _Wrapping, *, conditioned: str = "") -> Callable[..., Any]:
        """The forward pre-hook of the denoiser (``conditioned`` empty) or of the conditioned module
        of that name (a ControlNet, called before the denoiser in a step)."""
        adapter, engine = wrapping.adapter, wrapping.engine

        def pre_hook(
            _module: Any, args: tuple, kwargs: dict[str, Any]
        ) -> tuple[tuple, dict[str, Any]] | None:
            ctx = _ACTIVE.get()
            if ctx is None or ctx.wrapping is not wrapping:
                if ctx is not None and _shares_enforcement(ctx.wrapping, wrapping, _module):
                    return None  # that pipeline's own hook (same guard, same denoiser) enforces this call
                return self._unattributed(wrapping, ctx, conditioned or "denoiser")
            pending = ctx.pending
            if not conditioned:  # the denoiser's call ends the step, whatever happens below
                ctx.pending = None
            try:
                inputs = adapter.split(args, kwargs, ctx.info.batch_size)
                if inputs.cond is None:  # the unconditional call of a backbone that runs CFG halves apart
                    if ctx.state is None or inputs.uncond is None:
                        return None
                    return adapter.merge(
                        args, kwargs, replace(inputs, uncond=engine.uncond_only(inputs.uncond, ctx.state))
                    )
                if pending is not None:  # a conditioned module ran this step: the same conditioning
                    cond, uncond = self._as_pending(ctx, pending, inputs, conditioned or "the denoiser")
                else:
                    cond, uncond = self._advance(ctx, inputs)
                    if conditioned:
                        ctx.pending = (inputs.cond, inputs.uncond, cond, uncond)
                if not conditioned:
                    ctx.cfg = inputs.uncond is not None
                return self._put_back(ctx, args, kwargs, inputs, cond, uncond)
            except _Settled:
                raise
            except Exception as exc:
                return self._enforcement_failed(ctx, exc)

        # torch.compile: dynamo does not trace the hook (a compiled denoiser's graph stays whole;
        # with ``unet.compile()`` in place, the one frame the hook runs in is skipped, not split)
        return torch.compiler.disable(pre_hook, recursive=True)

    def _advance(self, ctx: _CallContext, inputs: Any) -> tuple[Any, Any]:
        """One denoising step of the engine on a hooked call's inputs: (cond, uncond) redirected."""
        engine = ctx.wrapping.engine
        ctx.steps += 1
        if ctx.state is None:
            ctx.state = engine.init_state(inputs.cond, ctx.flagged, rehearsal=ctx.rehearsal)
        step = ctx.state.step
        cond, uncond, ctx.state = engine.step(
            inputs.latents, inputs.timestep, inputs.cond, ctx.state, inputs.uncond
        )
        if ctx.rehearsal and engine.is_rewind_check_step(step):
            if bool(engine.rehearsal_settled(ctx.state)):  # a host read at these checks only
                raise _Settled
        return cond, _prompt_rows_moved(inputs.cond, inputs.uncond, cond, uncond)

    def _put_back(
        self, ctx: _CallContext, args: tuple, kwargs: dict[str, Any], inputs: Any, cond: Any, uncond: Any
    ) -> tuple[tuple, dict[str, Any]]:
        """The hooked call's arguments with the step's (redirected) conditioning put back and, where
        the call carries conditioning beside the prompt (:meth:`Adapter.side_conditioning`: an
        image prompt, grounding phrases), that withheld from every row whose conditioning moved:
        the redirector moves the prompt only, and a concept the image prompt carries would
        otherwise reach a sample the record calls redirected. No host read."""
        adapter = ctx.wrapping.adapter
        merged = adapter.merge(args, kwargs, replace(inputs, cond=cond, uncond=uncond))
        names = adapter.side_conditioning(args, kwargs)
        if not names:
            return merged
        ctx.side_conditioning.extend(n for n in names if n not in ctx.side_conditioning)
        moved_uncond = None if inputs.uncond is None else _rows_changed(inputs.uncond, uncond)
        return adapter.withhold_side_conditioning(*merged, _rows_changed(inputs.cond, cond), moved_uncond)

    def _as_pending(
        self, ctx: _CallContext, pending: tuple[Any, Any, Any, Any], inputs: Any, caller: str
    ) -> tuple[Any, Any]:
        """The redirected conditioning of the step a conditioned module (ControlNet) already ran,
        for a later call of the same step (the denoiser, or the module again). Its conditional
        half must be the one that call had; an unconditional half it did not have (a ControlNet in
        guess mode reads only the conditional rows) is moved as :meth:`RedirectionEngine.step`
        would have moved it."""
        assert ctx.state is not None
        seen_cond, seen_uncond, cond, uncond = pending
        if not _same(seen_cond, inputs.cond):
            raise EnforcementError(
                f"{caller} received other prompt conditioning than the ControlNet of the same denoising "
                f"step ({ctx.steps}); the guard redirects one conditioning per step"
            )
        if inputs.uncond is None:
            return cond, None
        if seen_uncond is None:
            moved = ctx.wrapping.engine.uncond_only(inputs.uncond, ctx.state)
            return cond, _prompt_rows_moved(inputs.cond, inputs.uncond, cond, moved)
        if not _same(seen_uncond, inputs.uncond):
            raise EnforcementError(
                f"{caller} received another unconditional (negative prompt) conditioning than the "
                f"ControlNet of the same denoising step ({ctx.steps})"
            )
        return cond, uncond

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

    def _unattributed(self, wrapping: _Wrapping, ctx: _CallContext | None, module: str = "denoiser") -> None:
        """The guarded denoiser (or ``module``: a hooked ControlNet) was called outside a guarded
        call of its pipeline: the base class's ``__call__``, a pipeline built from the wrapped
        one's components (``from_pipe``, img2img from the same UNet), the module called directly,
        or from inside another wrapped pipeline's call. Nothing can attribute it to a request (no prompt, no batch layout), so:
        closed raises :class:`EnforcementError` (no output); open lets it run unguarded, warns and
        writes a ``saferedir.unattributed`` audit record for the denoiser call."""
        pipeline = type(wrapping.pipe).__name__
        inside = f" (inside request {ctx.request_id} of another pipeline)" if ctx is not None else ""
        message = (
            f"the {module} of a {pipeline} wrapped by policy '{self.policy.name}' was called outside a "
            f"guarded call{inside}: call the wrapped pipeline itself, or wrap the pipeline you call"
        )
        if self.policy.fail_mode == "closed":
            raise EnforcementError(message + "; fail_mode is closed")
        warnings.warn(f"saferedir: {message}; NOT enforced (fail_mode: open)", stacklevel=3)
        self._write(
            UNATTRIBUTED_EVENT,
            uuid.uuid4().hex,
            {
                "adapter": wrapping.adapter.describe(),
                "fail_mode": self.policy.fail_mode,
                "fail_open": [{"concept": "*", "reason": message}],
            },
        )
        return None

    def _hidden_rows(self, ctx: _CallContext, latents: Any) -> torch.Tensor | None:
        """A bool mask broadcastable over ``latents`` (B, ...): the samples a ``block`` rule flags
        now and, in the first run of a call with ``rewind`` rules, the samples those have flagged
        (their unredirected trajectory goes on only until the second run replaces it); None when
        there are none or ``latents`` is not shaped like the call's batch."""
        if (
            ctx.state is None
            or not isinstance(latents, torch.Tensor)
            or latents.shape[0] != ctx.state.batch_size
        ):
            return None
        engine = ctx.wrapping.engine
        flagged = engine.blocked_now(ctx.state)
        if ctx.rehearsal:
            rehearsed = engine.flagged(ctx.state).any(dim=1)
            flagged = rehearsed if flagged is None else flagged | rehearsed
        if flagged is None:
            return None
        return flagged.to(latents.device).view(-1, *([1] * (latents.ndim - 1)))

    def _withheld(self, ctx: _CallContext, latents: Any) -> Any:
        """``latents`` with the rows :meth:`_hidden_rows` names replaced by zeros."""
        rows = self._hidden_rows(ctx, latents)
        return latents if rows is None else torch.where(rows, torch.zeros_like(latents), latents)

    def _withholding_callbacks(self, ctx: _CallContext, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``block`` means blocked: with a block rule, the caller's step callbacks
        (``callback_on_step_end``, a diffusers ``PipelineCallback`` included, and the legacy
        ``callback``) see zeros in place of the latents of samples a block rule flags at that
        step, and what they return for those rows is ignored (the real latents go on, so a trigger
        that is released later continues undisturbed). The same for the samples a ``rewind`` rule
        has flagged in the first run of a call: what they become there is never the image."""
        engine = ctx.wrapping.engine
        if not engine.rewinds and not any(c.rule.action == "block" for c in engine.concepts):
            return kwargs
        kwargs = dict(kwargs)
        on_step_end = kwargs.get("callback_on_step_end")
        if on_step_end is not None:

            def guarded_step_end(pipe: Any, step: int, t: Any, tensors: dict[str, Any]) -> Any:
                real = tensors.get("latents")
                rows = self._hidden_rows(ctx, real)
                if rows is None:
                    return on_step_end(pipe, step, t, tensors)
                returned = on_step_end(pipe, step, t, {**tensors, "latents": torch.where(rows, 0.0, real)})
                if isinstance(returned, dict) and "latents" in returned:  # the flagged rows stay real
                    returned = {**returned, "latents": torch.where(rows, real, returned["latents"])}
                return returned

            if hasattr(on_step_end, "tensor_inputs"):  # a PipelineCallback: keep its class and fields
                proxy_class = type(
                    type(on_step_end).__name__,
                    (type(on_step_end),),
                    {"__call__": lambda _self, *a: guarded_step_end(*a)},
                )
                proxy = object.__new__(proxy_class)
                proxy.__dict__.update(on_step_end.__dict__)
                kwargs["callback_on_step_end"] = proxy
            else:
                kwargs["callback_on_step_end"] = guarded_step_end
        legacy = kwargs.get("callback")
        if callable(legacy):
            kwargs["callback"] = lambda step, t, latents: legacy(step, t, self._withheld(ctx, latents))
        return kwargs

    def _not_enforced(self, ctx: _CallContext, problem: str, concept: str = "*") -> EnforcementError | None:
        """Something of this call cannot be enforced. Closed: the :class:`EnforcementError` to fail
        the call with. Open: a warning and a ``fail_open`` entry in the call's record; None."""
        if self.policy.fail_mode == "closed":
            return EnforcementError(
                f"request {ctx.request_id}: policy '{self.policy.name}' could not be enforced and "
                f"fail_mode is closed: {problem}"
            )
        warnings.warn(
            f"saferedir: request {ctx.request_id}: {problem}; NOT enforced (fail_mode: open)", stacklevel=4
        )
        ctx.runtime_failures.append({"concept": concept, "reason": problem})
        return None

    def _check_components(self, wrapping: _Wrapping, ctx: _CallContext) -> str | None:
        """Why the pipeline no longer has the modules ``wrap`` hooked and fingerprinted, or None.

        A module or tokenizer replaced is a problem; a tokenizer with another token count than at
        ``wrap`` has the backbone fingerprinted again (a token added: another vocabulary). A module
        whose weights changed since they were last checked (a :class:`WeightsProbe` per call, a few
        values of every tensor; a device or dtype move is no change) is hashed again and the
        backbone fingerprinted again, as ``wrap`` would: other text-encoder weights or another
        tokenizer are a problem (the bundles were matched to the ones ``wrap`` saw: a LoRA or
        textual inversion loaded after ``wrap``); other denoiser or ControlNet weights are
        enforced, as ``wrap`` enforces on an edited UNet, with a warning, and the records from then
        on carry their hash (``ctx.components``)."""
        now = _hooked(wrapping.adapter)
        for name, module in wrapping.components.items():
            if (
                now.get(name) is not module and unwrap_compiled(now.get(name)) is not module
            ):  # compiled: same model
                return (
                    f"pipe.{name} was replaced after wrap (the guard hooked and fingerprinted the old "
                    f"one): unwrap and wrap again"
                )
        tokenizers = wrapping.adapter.tokenizers()
        grown = []
        for name, (tokenizer, count) in wrapping.tokenizers.items():
            if tokenizers.get(name) is not tokenizer:
                return (
                    f"pipe.{name} was replaced after wrap (the guard fingerprinted the old one's "
                    f"vocabulary): unwrap and wrap again"
                )
            if len(tokenizer) != count:
                grown.append(f"pipe.{name} ({count} tokens at wrap, {len(tokenizer)} now)")
        with self._lock:
            hashes, probes = dict(wrapping.component_hashes), dict(wrapping.probes)
        ctx.components = hashes
        changed: dict[str, tuple[WeightsProbe, str]] = {}
        try:
            for name, module in wrapping.components.items():
                probe = WeightsProbe.read(module)
                why = probe.changed_since(probes[name])
                if why is not None:
                    changed[name] = (probe, why)
        except Exception as exc:  # a tensor type the probe cannot read: unchecked, so not enforced
            return f"the weights of pipe.{name} could not be checked: {type(exc).__name__}: {exc}"
        if not changed and not grown:
            return None
        what = ", ".join([*(f"pipe.{name} ({why})" for name, (_, why) in changed.items()), *grown])
        adapter = wrapping.adapter
        denoising = {
            id(unwrap_compiled(m)) for m in (adapter.denoiser, *adapter.conditioned_modules().values())
        }
        encoders = [
            name for name in changed if id(unwrap_compiled(wrapping.components[name])) not in denoising
        ]
        try:
            digests = {name: module_sha256(wrapping.components[name]) for name in changed}
            # the fingerprint names the text encoders and tokenizers: read again only where one changed
            difference = (
                wrapping.fingerprint.first_difference(adapter.fingerprint()) if encoders or grown else None
            )
        except Exception as exc:  # e.g. weights offloaded to the meta device
            return f"{what} changed after wrap and could not be read again: {type(exc).__name__}: {exc}"
        ctx.components = {**hashes, **digests}  # the record names what this call had, enforced or not
        if difference is not None:
            key, then, later = difference
            return (
                f"{what} changed after wrap: {key} was {then} at wrap and is {later} now (a LoRA or "
                f"textual inversion loaded into a text encoder?); the redirectors were matched to what "
                f"wrap saw: unwrap and wrap again"
            )
        for name, (_, why) in changed.items():
            if digests[name] != hashes[name]:  # not only moved to another device or dtype
                warnings.warn(
                    f"saferedir: pipe.{name}'s weights changed after wrap ({why}); enforced as wrap "
                    f"enforces on edited weights, and audit records carry their new hash",
                    stacklevel=4,
                )
        with self._lock:
            wrapping.component_hashes.update(digests)
            wrapping.probes.update({name: probe for name, (probe, _) in changed.items()})
        return None

    def _check_finite(self, ctx: _CallContext, decisions: list[list[Any]]) -> EnforcementError | None:
        """A NaN/inf score or delta at any check is an enforcement failure: the engine counted the
        score as a trigger and zeroed the delta, so nothing non-finite reached the denoiser, but the
        redirector's judgement was not available. Closed: the call fails (no images). Open: the
        record lists it under ``fail_open``."""
        bad = sorted({(d.concept, i) for i, row in enumerate(decisions) for d in row if d.nonfinite})
        for concept in sorted({c for c, _ in bad}):
            samples = [i for c, i in bad if c == concept]
            error = self._not_enforced(
                ctx, f"non-finite redirector output (NaN/inf score or delta) for samples {samples}", concept
            )
            if error is not None:
                return error
        return None

    def _check_decided(self, ctx: _CallContext, decisions: list[list[Any]]) -> EnforcementError | None:
        """A rule that did not act on a sample and had fewer checks that could trigger than it needs
        to decide (1; ``confirm_checks`` for a ``rewind`` rule, which only acts once confirmed) did not
        enforce anything there: too few steps for its window, ``replace_steps`` or ``decide_at_t``.
        Closed: the call fails (no images). Open: the record lists it under ``fail_open``."""
        for k, concept in enumerate(ctx.wrapping.engine.concepts):
            rule = concept.rule
            if rule.action == "monitor":
                continue
            need = rule.confirm_checks if rule.rewind else 1
            short = [
                (i, d.deciding_checks)
                for i, row in enumerate(decisions)
                if not ((d := row[k]).applied or d.triggered or d.rewound) and d.deciding_checks < need
            ]
            if not short:
                continue
            had = sorted({n for _, n in short})
            error = self._not_enforced(
                ctx,
                f"rule '{rule.concept}' had {' or '.join(map(str, had))} check(s) that could trigger for samples "
                f"{[i for i, _ in short]} and needs {need} (a check every replace_steps + 1 = "
                f"{rule.replace_steps + 1} steps of window {rule.window.start}..{rule.window.stop or 'end'}, "
                f"deciding at normalised timestep <= decide_at_t {rule.decide_at_t}"
                + (f", confirm_checks {need} with rewind" if rule.rewind else "")
                + f"; the call ran {ctx.steps} denoiser steps): run more steps or change the rule",
                rule.concept,
            )
            if error is not None:
                return error
        return None

    def _guarded_call(
        self, wrapping: _Wrapping, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]
    ) -> Any:
        info = wrapping.adapter.call_info(args, kwargs)
        ctx = _CallContext(wrapping=wrapping, request_id=uuid.uuid4().hex, info=info)
        start = time.perf_counter()
        output: Any = None
        error: BaseException | None = None
        with self._lock:
            started = wrapping.active
            wrapping.in_flight += started
        if not started:
            error = EnforcementError(
                f"request {ctx.request_id}: the pipeline was unwrapped while this call started; not run"
            )
        else:
            try:
                self._write(
                    START_EVENT,
                    ctx.request_id,
                    {
                        "adapter": wrapping.adapter.describe(),
                        "batch_size": info.batch_size,
                        "fail_mode": self.policy.fail_mode,
                    },
                )
                problem = self._check_components(wrapping, ctx)
                if problem is not None and (failed := self._not_enforced(ctx, problem)) is not None:
                    raise failed
                token = _ACTIVE.set(ctx)
                try:
                    output = self._run(ctx, call, args, self._withholding_callbacks(ctx, kwargs))
                finally:
                    _ACTIVE.reset(token)
                if ctx.steps == 0 and wrapping.engine.concepts and not ctx.runtime_failures:
                    failed = self._not_enforced(
                        ctx, "the call finished without one denoiser call reaching the hook"
                    )
                    if failed is not None:
                        raise failed
            except BaseException as exc:  # recorded, then re-raised unchanged
                error = exc
                if isinstance(exc, EnforcementError):
                    output = None
            finally:
                with self._lock:
                    wrapping.in_flight -= 1

        decisions = wrapping.engine.decisions(ctx.state) if ctx.state is not None else None
        if decisions is not None and ctx.rehearsed is not None:
            decisions = _merged(ctx.rehearsed, decisions)
        if error is None and decisions is not None:
            error = self._check_finite(ctx, decisions) or self._check_decided(ctx, decisions)
            if error is not None:
                output = None
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
            rehearsed_steps=ctx.rehearsed_steps,
            side_conditioning=ctx.side_conditioning,
            redact=(lambda m: m)
            if self.policy.audit.prompt_logging == "full"
            else (lambda m: scrub(m, info.prompts)),
        )
        if error is None and report.blocked and self.policy.block.mode == "placeholder":
            output = wrapping.adapter.replace_samples(
                output, report.blocked, tuple(self.policy.block.color), info
            )
        report = replace(report, latency_ms=round((time.perf_counter() - start) * 1000.0, 3))
        self._local.last_report = report
        self._emit(wrapping, report, ctx.components)
        if error is not None:
            raise error
        if report.blocked and self.policy.block.mode == "raise":
            raise GenerationBlocked(report)
        return output

    def _run(self, ctx: _CallContext, call: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        """The pipeline call; with ``rewind`` rules a first run that decides and, when it flags
        samples, a second from the same starting noise that redirects them from the start."""
        engine = ctx.wrapping.engine
        if not engine.rewinds:
            return call(*args, **kwargs)
        snapshot = _RngSnapshot(args, kwargs)
        ctx.rehearsal = True
        try:
            output = call(*args, **kwargs)
        except _Settled:
            output = None
        finally:
            ctx.rehearsal = False
        if ctx.state is None:
            return output
        flagged = engine.flagged(ctx.state)
        if output is not None and not bool(flagged.any()):  # one host read per call
            return output
        ctx.rehearsed = engine.decisions(ctx.state)
        ctx.rehearsed_steps, ctx.flagged = ctx.steps, flagged
        ctx.state, ctx.steps, ctx.pending = None, 0, None
        snapshot.restore()
        return call(*args, **kwargs)

    def _emit(self, wrapping: _Wrapping, report: CallReport, components: dict[str, str] | None) -> None:
        record = report.to_dict()
        request_id = record.pop("request_id")
        record.update(
            bundles=wrapping.bundles,
            backbone_mismatch=wrapping.mismatches,
            components=wrapping.component_hashes if components is None else components,
            backbone=wrapping.fingerprint.to_dict(),
            adapter=wrapping.adapter.describe(),
            fail_mode=self.policy.fail_mode,
        )
        self._write("saferedir.generation", request_id, record)

    def _write(self, event: str, request_id: str, record: dict[str, Any]) -> None:
        """Emit a record to every sink. Closed: a sink that fails raises :class:`EnforcementError`
        (for a generation record after a ``saferedir.voided`` record went to the sinks that work, so
        no trail shows a success the caller never got). Open: a warning, and the next record says
        which records which sinks lost (``fail_open``)."""
        with self._lock:
            pending = list(self._unwritten)
        if pending and "fail_open" in record:
            record = {**record, "fail_open": [*record["fail_open"], *pending]}
        try:
            self.audit.emit_event(event, request_id, record)
        except AuditWriteError as exc:
            failed = [name for name, _ in exc.failures]
            if self.policy.fail_mode == "closed":
                if event == "saferedir.generation":
                    reason = f"the generation record could not be written to {failed}; the call failed"
                    try:
                        self.audit.emit_event(VOIDED_EVENT, request_id, {"reason": reason}, skip=failed)
                    except AuditWriteError:
                        pass  # nothing more to be done: the caller gets the error below
                raise EnforcementError(
                    f"request {request_id}: the audit record could not be written and fail_mode is closed: {exc}"
                ) from exc
            warnings.warn(
                f"saferedir: {event} record of request {request_id} was not written: {exc}", stacklevel=4
            )
            with self._lock:
                self._unwritten.append(
                    {
                        "concept": "*",
                        "reason": f"audit: the {event} record of request {request_id} was lost by {failed}",
                    }
                )
            return
        if pending and "fail_open" in record:
            with self._lock:
                del self._unwritten[: len(pending)]
