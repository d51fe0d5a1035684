"""The redirection engine: the tensor logic of one denoising step for N concepts and a batch.

Per step it decides, per sample and concept, whether the generation is unsafe, and moves the
conditional prompt embeddings of the samples that are. All per-sample state (triggered, first
step, max score, cached deltas) lives in tensors on the model's device: no ``.item()``, no host
sync and no Python branch on a tensor value inside the loop. Which concepts are checked at a step
depends only on host integers (the step index and each rule's schedule). The host reads the
decisions once, at the end of a call (:meth:`RedirectionEngine.decisions`).

Schedule (the reference implementation's): a concept is checked at the first step of its window
and then every ``replace_steps + 1`` steps; between checks the last decision and delta are kept.
With ``sticky`` a sample that triggered once stays triggered for the rest of the call.
Several concepts combine deterministically: each delta is computed from the same unredirected
embeddings and the deltas of all triggered ``redirect`` concepts are summed, so the result does
not depend on the order of the rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import TensorShapeError
from .policy import EffectiveRule
from .redirector import Redirector, apply_redirection


@dataclass(frozen=True)
class EngineConcept:
    """One enforced concept: its rule (after defaults) and its redirector."""

    rule: EffectiveRule
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
        step: index of the next denoiser call (host int).
        triggered: (B, K) bool, the current decision per sample and concept.
        first_step: (B, K) int64, first step a check triggered, -1 if never.
        max_score: (B, K) float32, highest p(unsafe) seen at a check, -1 if never checked.
        deltas: (K, B, T, D) float32, the last computed redirection delta per concept.
        checks: (K,) host ints, how many checks each concept ran.
    """

    step: int
    triggered: torch.Tensor
    first_step: torch.Tensor
    max_score: torch.Tensor
    deltas: torch.Tensor
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
    triggered: bool  # a check triggered at least once in the call
    first_step: int | None


class RedirectionEngine:
    """Applies K concept redirectors to the conditional embeddings of a batch, step by step."""

    def __init__(self, concepts: Sequence[EngineConcept]):
        self.concepts = list(concepts)
        names = [c.name for c in self.concepts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate concepts in engine: {names}")
        dims = {(c.redirector.config.seq_len, c.redirector.config.token_dim) for c in self.concepts}
        if len(dims) > 1:
            raise ValueError(f"all redirectors of one engine must share (tokens, dim); got {sorted(dims)}")

    def init_state(self, cond: torch.Tensor) -> EngineState:
        """Fresh state for a batch shaped like ``cond`` (B, T, D)."""
        b, t, d = cond.shape
        k = len(self.concepts)
        device = cond.device
        return EngineState(
            step=0,
            triggered=torch.zeros(b, k, dtype=torch.bool, device=device),
            first_step=torch.full((b, k), -1, dtype=torch.int64, device=device),
            max_score=torch.full((b, k), -1.0, dtype=torch.float32, device=device),
            deltas=torch.zeros(k, b, t, d, dtype=torch.float32, device=device),
            checks=[0] * k,
        )

    @torch.no_grad()
    def step(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float | int,
        cond: torch.Tensor,
        state: EngineState,
        uncond: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, EngineState]:
        """One denoiser call.

        Args:
            latents: (B, C, H, W) the conditional samples' latents as the denoiser receives them.
            timestep: () or (B,) timestep, or a Python number.
            cond: (B, T, D) conditional prompt embeddings (unredirected).
            state: from :meth:`init_state` or the previous step; updated in place and returned.
            uncond: (B, T, D) unconditional embeddings of a CFG batch, moved only by concepts whose
                rule says ``apply_to_uncond``.

        Returns:
            (redirected cond, possibly redirected uncond, state). Samples with no triggered
            ``redirect`` concept are returned bit-identical.
        """
        if cond.shape[0] != state.batch_size or tuple(cond.shape[1:]) != tuple(state.deltas.shape[2:]):
            raise TensorShapeError(
                "encoder_hidden_states (conditional half)", f"({state.batch_size}, {state.deltas.shape[2]}, "
                f"{state.deltas.shape[3]})", tuple(cond.shape))
        if latents.shape[0] != state.batch_size:
            raise TensorShapeError("sample (conditional half)", f"({state.batch_size}, C, H, W)", tuple(latents.shape))
        if uncond is not None and uncond.shape != cond.shape:
            raise TensorShapeError("encoder_hidden_states (unconditional half)", str(tuple(cond.shape)), tuple(uncond.shape))
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=latents.device)
        timestep = timestep.to(latents.device)

        step = state.step
        total = torch.zeros_like(state.deltas[0]) if self.concepts else None
        total_uncond = torch.zeros_like(total) if uncond is not None and total is not None else None
        any_cond = torch.zeros(state.batch_size, dtype=torch.bool, device=cond.device)
        any_uncond = torch.zeros_like(any_cond)

        for k, concept in enumerate(self.concepts):
            rule = concept.rule
            if concept.is_check_step(step):
                out = concept.redirector(latents, timestep, cond)
                score = torch.sigmoid(out.logit.float())
                hit = score >= rule.threshold
                state.triggered[:, k] = (state.triggered[:, k] | hit) if rule.sticky else hit
                state.first_step[:, k] = torch.where(hit & (state.first_step[:, k] < 0), step, state.first_step[:, k])
                state.max_score[:, k] = torch.maximum(state.max_score[:, k], score)
                state.checks[k] += 1
                if rule.action == "redirect":
                    state.deltas[k] = apply_redirection(cond, out.direction, out.mask, out.alpha, rule.strength).float()
            if rule.action != "redirect" or not rule.window.contains(step):
                continue
            on = state.triggered[:, k]
            contribution = torch.where(on[:, None, None], state.deltas[k], 0.0)
            total = total + contribution
            any_cond = any_cond | on
            if total_uncond is not None and rule.apply_to_uncond:
                total_uncond = total_uncond + contribution
                any_uncond = any_uncond | on

        state.step = step + 1
        if total is None:
            return cond, uncond, state
        new_cond = torch.where(any_cond[:, None, None], cond + total.to(cond.dtype), cond)
        new_uncond = uncond
        if total_uncond is not None:
            new_uncond = torch.where(any_uncond[:, None, None], uncond + total_uncond.to(uncond.dtype), uncond)
        return new_cond, new_uncond, state

    def decisions(self, state: EngineState) -> list[list[ConceptDecision]]:
        """Per sample, per concept outcome. The only host transfer of a call: one ``.cpu()``."""
        packed = torch.stack([state.first_step.to(torch.float64), state.max_score.to(torch.float64)]).cpu()
        first, score = packed[0].tolist(), packed[1].tolist()
        result = []
        for i in range(state.batch_size):
            row = []
            for k, concept in enumerate(self.concepts):
                row.append(
                    ConceptDecision(
                        concept=concept.name,
                        checks=state.checks[k],
                        max_score=round(score[i][k], 6) if state.checks[k] else None,
                        triggered=first[i][k] >= 0,
                        first_step=int(first[i][k]) if first[i][k] >= 0 else None,
                    )
                )
            result.append(row)
        return result
