"""The redirection engine: the tensor logic of one denoising step for N concepts and a batch.

Per step it decides, per sample and concept, whether the generation is unsafe, and moves the
conditional text conditioning (every token stream, and the pooled embedding where the redirector
has a pooled head) of the samples that are. All per-sample state (triggered, first step, max
score, cached deltas) lives in tensors on the model's device: no ``.item()``, no host sync and no
Python branch on a tensor value inside the loop. Which concepts are checked at a step depends
only on host integers (the step index and each rule's schedule). The host reads the decisions
once, at the end of a call (:meth:`RedirectionEngine.decisions`).

Schedule (the reference implementation's): a concept is checked at the first step of its window
and then every ``replace_steps + 1`` steps; between checks the last decision and delta are kept.
With ``sticky`` a sample that triggered stays triggered for the rest of the call once
``confirm_checks`` consecutive checks said so; before that a check that no longer sees the concept
releases it (the decision is revised while the trajectory still says otherwise). With
``escalate`` > 1, a check that still sees the concept in a sample already being redirected
multiplies that sample's strength (up to ``escalate_max``): a redirection too weak to move the
image does not end in an escape. Neither adds a check: both act at the schedule's checks.
Several concepts combine deterministically: each delta is computed from the same unredirected
conditioning and the deltas of all triggered ``redirect`` concepts are summed, so the result does
not depend on the order of the rules.

A step is one :meth:`RedirectionEngine.step` call: one denoiser call of a CFG-batched backbone,
or the conditional call of a backbone that runs the halves as separate calls (FLUX's true CFG),
whose unconditional call then goes through :meth:`RedirectionEngine.uncond_only`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .conditioning import Conditioning
from .errors import TensorShapeError
from .policy import ConceptRule
from .redirector import Redirector, redirection


@dataclass(frozen=True)
class EngineConcept:
    """One enforced concept: its effective rule (defaults applied) and its redirector."""

    rule: ConceptRule
    redirector: Redirector

    @property
    def name(self) -> str:
        return self.rule.concept

    def is_check_step(self, step: int) -> bool:
        window = self.rule.window
        return window.contains(step) and (step - window.start) % (self.rule.replace_steps + 1) == 0


@dataclass
class EngineState:
    """Per-call state for a batch of B samples and K concepts (tensors on the model's device).

    Attributes:
        step: index of the next denoising step (host int).
        triggered: (B, K) bool, the current decision per sample and concept.
        hits: (B, K) int64, consecutive positive checks (kept once stuck).
        stuck: (B, K) bool, the trigger can no longer be released (sticky, confirmed).
        boost: (B, K) float32, the escalation multiplier of the strength (1 until escalated).
        first_step: (B, K) int64, first step a check triggered, -1 if never.
        max_score: (B, K) float32, highest finite p(unsafe) seen at a check, -1 if never checked.
        applied: (B, K) bool, the concept's redirection moved the sample's conditional
            conditioning at some step (a trigger released later still moved it then).
        nonfinite: (B, K) bool, a check produced a NaN/inf score or delta for the sample (an
            enforcement failure: the guard fails the call under ``closed``). Such a score counts as
            a trigger and such a delta as zero, so nothing non-finite reaches the denoiser.
        deltas: per concept, the last computed redirection delta (float32, shaped like the
            conditional conditioning).
        checks: (K,) host ints, how many checks each concept ran.
    """

    step: int
    triggered: torch.Tensor
    hits: torch.Tensor
    stuck: torch.Tensor
    boost: torch.Tensor
    first_step: torch.Tensor
    max_score: torch.Tensor
    applied: torch.Tensor
    nonfinite: torch.Tensor
    deltas: list[Conditioning]
    checks: list[int] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return self.triggered.shape[0]


@dataclass(frozen=True)
class ConceptDecision:
    """Host-side outcome for one sample and concept, read once at the end of a call."""

    concept: str
    checks: int
    max_score: float | None
    triggered: bool  # the sample was still triggered when the call ended
    first_step: int | None  # the first step a check triggered (also for a trigger later released)
    escalation: float = 1.0  # the final strength multiplier
    applied: bool = False  # its redirection moved the sample at some step (also if released later)
    nonfinite: bool = False  # a check gave a NaN/inf score or delta (an enforcement failure)


def _zeros_like(cond: Conditioning) -> Conditioning:
    return cond.map(lambda t: torch.zeros(t.shape, dtype=torch.float32, device=t.device))


class RedirectionEngine:
    """Applies K concept redirectors to the conditional conditioning of a batch, step by step."""

    def __init__(self, concepts: Sequence[EngineConcept]):
        self.concepts = list(concepts)
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate concepts in engine: {names}")
        streams = {c.redirector.config.streams for c in self.concepts}
        if len(streams) > 1:
            raise ValueError(
                f"all redirectors of one engine must read the same token streams; got {sorted(map(str, streams))}"
            )

    def init_state(self, cond: Conditioning) -> EngineState:
        """Fresh state for a batch shaped like ``cond``."""
        b, k, device = cond.batch_size, len(self.concepts), cond.device
        return EngineState(
            step=0,
            triggered=torch.zeros(b, k, dtype=torch.bool, device=device),
            hits=torch.zeros(b, k, dtype=torch.int64, device=device),
            stuck=torch.zeros(b, k, dtype=torch.bool, device=device),
            boost=torch.ones(b, k, dtype=torch.float32, device=device),
            first_step=torch.full((b, k), -1, dtype=torch.int64, device=device),
            max_score=torch.full((b, k), -1.0, dtype=torch.float32, device=device),
            applied=torch.zeros(b, k, dtype=torch.bool, device=device),
            nonfinite=torch.zeros(b, k, dtype=torch.bool, device=device),
            deltas=[_zeros_like(cond) for _ in range(k)],
            checks=[0] * k,
        )

    def _check_shapes(
        self, latents: torch.Tensor, cond: Conditioning, state: EngineState, uncond: Conditioning | None
    ) -> None:
        reference = state.deltas[0] if state.deltas else None
        if cond.batch_size != state.batch_size or (
            reference is not None and [t.shape for t in cond.tokens] != [t.shape for t in reference.tokens]
        ):
            expected = (
                [tuple(t.shape) for t in reference.tokens]
                if reference is not None
                else f"batch {state.batch_size}"
            )
            raise TensorShapeError("conditional token streams", str(expected), tuple(cond.tokens[0].shape))
        if latents.shape[0] != state.batch_size:
            raise TensorShapeError(
                "latents (conditional half)", f"({state.batch_size}, C, H, W)", tuple(latents.shape)
            )
        if uncond is not None and [t.shape for t in uncond.tokens] != [t.shape for t in cond.tokens]:
            raise TensorShapeError(
                "unconditional token streams",
                str([tuple(t.shape) for t in cond.tokens]),
                tuple(uncond.tokens[0].shape),
            )

    @torch.no_grad()
    def step(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        cond: Conditioning,
        state: EngineState,
        uncond: Conditioning | None = None,
    ) -> tuple[Conditioning, Conditioning | None, EngineState]:
        """One denoising step.

        Args:
            latents: (B, C, H, W) the conditional samples' latent view.
            timestep: () or (B,) normalised timestep (0 clean .. 1 noise), or a Python number.
            cond: the conditional conditioning (unredirected).
            state: from :meth:`init_state` or the previous step; updated in place and returned.
            uncond: the unconditional conditioning of a CFG batch, moved only by concepts whose
                rule says ``apply_to_uncond``.

        Returns:
            (redirected cond, possibly redirected uncond, state). Samples with no triggered
            ``redirect`` concept are returned bit-identical.
        """
        self._check_shapes(latents, cond, state, uncond)
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=latents.device)
        timestep = timestep.to(latents.device)

        step = state.step
        for k, concept in enumerate(self.concepts):
            if not concept.is_check_step(step):
                continue
            rule = concept.rule
            out = concept.redirector(latents, timestep, cond)
            score = torch.sigmoid(out.logit.float())
            finite = torch.isfinite(score)
            hit = (score >= rule.threshold) | ~finite  # NaN never reads as "safe"
            was_on = state.triggered[:, k].clone()  # (a view would see the update below)
            if rule.sticky:
                hits = torch.where(
                    hit, state.hits[:, k] + 1, torch.where(state.stuck[:, k], state.hits[:, k], 0)
                )
                state.hits[:, k] = hits
                state.stuck[:, k] = state.stuck[:, k] | (hits >= rule.confirm_checks)
                state.triggered[:, k] = state.stuck[:, k] | hit
            else:
                state.triggered[:, k] = hit
            if rule.escalate > 1.0:
                raised = (state.boost[:, k] * rule.escalate).clamp(max=rule.escalate_max)
                state.boost[:, k] = torch.where(hit & was_on, raised, state.boost[:, k])
            state.first_step[:, k] = torch.where(
                hit & (state.first_step[:, k] < 0), step, state.first_step[:, k]
            )
            state.max_score[:, k] = torch.maximum(state.max_score[:, k], torch.where(finite, score, -1.0))
            bad = ~finite
            state.checks[k] += 1
            if rule.action == "redirect":
                strength = rule.strength * state.boost[:, k] if rule.escalate > 1.0 else rule.strength
                delta = redirection(cond, out, strength)
                if not rule.move_pooled and delta.pooled is not None:
                    delta = Conditioning(delta.tokens, torch.zeros_like(delta.pooled))
                for part in delta.parts():
                    bad = bad | ~torch.isfinite(part).flatten(1).all(dim=1)
                state.deltas[k] = delta.map(lambda d: torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0))
            state.nonfinite[:, k] |= bad
        state.step = step + 1
        new_cond = self._apply(cond, state, step, uncond_side=False)
        new_uncond = None if uncond is None else self._apply(uncond, state, step, uncond_side=True)
        return new_cond, new_uncond, state

    @torch.no_grad()
    def uncond_only(self, uncond: Conditioning, state: EngineState) -> Conditioning:
        """The unconditional half of the step :meth:`step` last ran, when the backbone runs it as a
        call of its own: moved by the ``apply_to_uncond`` concepts triggered at that step."""
        if state.step == 0:
            return uncond
        return self._apply(uncond, state, state.step - 1, uncond_side=True)

    def _apply(
        self, target: Conditioning, state: EngineState, step: int, *, uncond_side: bool
    ) -> Conditioning:
        """``target`` plus the summed deltas of the ``redirect`` concepts triggered per sample."""
        total: Conditioning | None = None
        moved = torch.zeros(state.batch_size, dtype=torch.bool, device=state.triggered.device)
        for k, concept in enumerate(self.concepts):
            rule = concept.rule
            if (
                rule.action != "redirect"
                or not rule.window.contains(step)
                or (uncond_side and not rule.apply_to_uncond)
            ):
                continue
            on = state.triggered[:, k]
            if not uncond_side:
                state.applied[:, k] |= on
            contribution = state.deltas[k].masked(on)
            total = contribution if total is None else total.zip_with(contribution, torch.add)
            moved = moved | on
        if total is None:
            return target
        shifted = target.zip_with(total, lambda t, d: t + d.to(t.dtype))
        return shifted.where(moved, target)

    def blocked_now(self, state: EngineState) -> torch.Tensor | None:
        """(B,) bool: the samples a ``block`` rule flags at this point of the call (device tensor,
        no host read), or None when no rule blocks."""
        columns = [k for k, c in enumerate(self.concepts) if c.rule.action == "block"]
        if not columns:
            return None
        return state.triggered[:, columns].any(dim=1)

    def decisions(self, state: EngineState) -> list[list[ConceptDecision]]:
        """Per sample, per concept outcome. The only host transfer of a call: one ``.cpu()``."""
        packed = torch.stack(
            [
                state.first_step.to(torch.float64),
                state.max_score.to(torch.float64),
                state.triggered.to(torch.float64),
                state.boost.to(torch.float64),
                state.nonfinite.to(torch.float64),
                state.applied.to(torch.float64),
            ]
        ).cpu()
        first, score, on, boost, bad, moved = (packed[i].tolist() for i in range(6))
        result = []
        for i in range(state.batch_size):
            row = []
            for k, concept in enumerate(self.concepts):
                row.append(
                    ConceptDecision(
                        concept=concept.name,
                        checks=state.checks[k],
                        max_score=round(score[i][k], 6) if state.checks[k] else None,
                        triggered=on[i][k] > 0,
                        first_step=int(first[i][k]) if first[i][k] >= 0 else None,
                        escalation=round(boost[i][k], 4),
                        applied=moved[i][k] > 0,
                        nonfinite=bad[i][k] > 0,
                    )
                )
            result.append(row)
        return result
