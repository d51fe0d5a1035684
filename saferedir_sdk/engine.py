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
image does not end in an escape. Neither adds a check: both act at the schedule's checks. A sample
whose last ``confirm_checks`` deciding checks all saw the concept while the rule was already moving it
is *unresolved* (the redirection, escalated, did not clear it); the rule's ``unresolved`` setting
says whether its image is returned or withheld (the guard's report, when the call ends). Only a
classifier that reads the latent alone can tell (:func:`judges_unresolved`); for others it is None.
A check at a normalised timestep above the rule's ``decide_at_t`` records its score and never
triggers (the decision waits for a latent that shows something; a noise level, so it means the same
at any number of steps). ``deciding_checks`` counts the checks that could trigger: the guard
refuses a call in which a rule had too few to decide (fail closed). A ``rewind`` rule does not move
anything while the state is a *rehearsal* (the guard's first run of a call): the samples it confirms there are
:meth:`RedirectionEngine.flagged`, and a state made with them (``init_state(cond, flagged)``, the
guard's second run from the same noise) has them stuck from the first check on (moved from the
first step at or below the rule's ``redirect_at_t``, 1 by default: from the first). In either run a
``rewind`` rule acts only on samples it confirmed (``confirm_checks`` hits in a row): the second run
replays the first run's trajectory for the samples it did not flag, so an unconfirmed hit there must
not move them (their images would depend on whether a batch mate was flagged).
A ``gates: yield`` rule reads the heads' gates (``alpha``, the token masks, the pooled gate: they
read the prompt) once per sample, at the first check at which the sample is triggered in a run where
the rule moves it (a ``rewind`` rule's second run: its first check); if they shut the
move out there, it opens them (:func:`~saferedir_sdk.redirector.open_gates`) for the rest of the call,
so the classifier's decision is not vetoed by words the heads do not know (``gates_opened``).
A rule with a ``shift`` adds to its heads' delta a move of every token (and the pooled embedding)
along one direction of the encoder's space (:func:`~saferedir_sdk.redirector.shift_delta`, scaled
by the token's norm, the shift's ``scale`` and the rule's strength): a flagged sample whose words
the heads do not recognise (a description) still moves.
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
from .redirector import Redirector, RedirectorConfig, open_gates, redirection, shift_delta, shut_gates
from .stacked import StackedRedirectors


@dataclass(frozen=True)
class EngineConcept:
    """One enforced concept: its effective rule (defaults applied), its redirector and, for a rule
    with a ``shift``, the shift's unit direction in the backbone's encoder space
    (:func:`~saferedir_sdk.redirector.shift_direction`: (D_s,) per stream, (P,) pooled)."""

    rule: ConceptRule
    redirector: Redirector
    shift: Conditioning | None = None

    def __post_init__(self) -> None:
        if (self.rule.shift is None) != (self.shift is None):
            raise ValueError(
                f"concept '{self.rule.concept}': a rule with a shift needs its direction and a direction "
                f"needs a rule with a shift (rule shift {'set' if self.rule.shift else 'unset'}, direction "
                f"{'given' if self.shift is not None else 'missing'})"
            )
        if self.shift is not None:
            config = self.redirector.config
            parts = [
                (f"token stream {i}", s.dim, d)
                for i, (s, d) in enumerate(zip(config.streams, self.shift.tokens))
            ]
            if len(self.shift.tokens) != len(config.streams):
                raise ValueError(
                    f"concept '{self.rule.concept}': the shift direction has {len(self.shift.tokens)} token "
                    f"stream(s), the redirector reads {len(config.streams)}"
                )
            if bool(config.pooled_dim) != (self.shift.pooled is not None):
                raise ValueError(
                    f"concept '{self.rule.concept}': the shift direction {'lacks' if config.pooled_dim else 'has'} "
                    "a pooled part, the redirector reads " + ("one" if config.pooled_dim else "none")
                )
            if self.shift.pooled is not None:
                parts.append(("pooled", config.pooled_dim, self.shift.pooled))
            for name, dim, d in parts:
                if tuple(d.shape) != (dim,):
                    raise TensorShapeError(
                        f"shift direction of '{self.rule.concept}', {name}", f"({dim},)", tuple(d.shape)
                    )

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
        max_deciding: (B, K) float32, highest finite p(unsafe) seen at a deciding check (at or below
            the rule's ``decide_at_t``: one that could trigger), -1 if none.
        applied: (B, K) bool, the concept's redirection moved the sample's conditional
            conditioning at some step (a trigger released later still moved it then).
        nonfinite: (B, K) bool, a check produced a NaN/inf score or delta for the sample (an
            enforcement failure: the guard fails the call under ``closed``). Such a score counts as
            a trigger and such a delta as zero, so nothing non-finite reaches the denoiser.
        deltas: per concept group, the last computed redirection deltas (float32, (K_g, ...) of
            the conditional conditioning's shapes).
        checks: (K,) host ints, how many checks each concept ran (in the engine's concept order).
        token_shapes: the conditional token streams' shapes the state was made for.
        rehearsal: host bool, the guard's first run of a call with ``rewind`` rules: those rules
            decide and do not move anything.
        rewound: (B, K) bool, the samples a first run flagged (``init_state(cond, flagged)``).
        deciding: (B, K) int64, checks at a timestep at or below the rule's ``decide_at_t`` (the
            checks that could trigger).
        persist: (B, K) int64, consecutive deciding checks that saw the concept while the rule was
            already moving the sample (0 after a deciding check that did not).
        timestep: the normalised timestep of the step last run (() or (B,) on the device; None
            before the first): a rule moves a sample only at or below its ``redirect_at_t``.
        gates_read: (B, K) bool, a ``gates: yield`` rule has read the heads' gates of the sample:
            at the first check at which it was moving it (triggered; in a second run, from the first
            check).
        opening: (B, K) bool, the gates were shut there, so the rule opens them for the rest of the
            call (every check's delta with its gates under 0.5 opened).
        opened: (B, K) bool, a move from opened gates reached the sample's conditioning at some
            step (the audit's ``gates_opened``).

    The (B, K) tensors' columns are in the engine's group order: concept ``k``'s is
    :meth:`RedirectionEngine.column` ``(k)``.
    """

    step: int
    triggered: torch.Tensor
    hits: torch.Tensor
    stuck: torch.Tensor
    boost: torch.Tensor
    first_step: torch.Tensor
    max_score: torch.Tensor
    max_deciding: torch.Tensor
    applied: torch.Tensor
    nonfinite: torch.Tensor
    rewound: torch.Tensor
    deciding: torch.Tensor
    persist: torch.Tensor
    gates_read: torch.Tensor
    opening: torch.Tensor
    opened: torch.Tensor
    deltas: list[Conditioning]
    checks: list[int] = field(default_factory=list)
    token_shapes: list[tuple[int, ...]] = field(default_factory=list)
    rehearsal: bool = False
    timestep: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.triggered.shape[0]


@dataclass(frozen=True)
class ConceptDecision:
    """Host-side outcome for one sample and concept, read once at the end of a call."""

    concept: str
    checks: int
    max_score: float | None  # at any check (a check above decide_at_t too, which cannot trigger)
    triggered: bool  # the sample was still triggered when the call ended
    first_step: int | None  # the first step a check triggered (also for a trigger later released)
    escalation: float = 1.0  # the final strength multiplier
    applied: bool = False  # its redirection moved the sample at some step (also if released later)
    nonfinite: bool = False  # a check gave a NaN/inf score or delta (an enforcement failure)
    rewound: bool = False  # a rewind rule flagged it in the first run; it was regenerated redirected
    deciding_checks: int = 0  # checks at or below the rule's decide_at_t (that could trigger)
    gates_opened: bool = False  # under gates: yield, a move reached it through gates the heads had shut
    # the highest finite p(unsafe) at a deciding check (one that could trigger); None where none gave one
    max_deciding_score: float | None = None
    # a rule with a shift that moved the sample: the share of each token state's norm the shift moved
    # it by at its final strength (scale x strength x escalation); None where no shift moved it
    shift: float | None = None
    # its last confirm_checks deciding checks all saw the concept while the rule was moving it; None
    # where that cannot be told (not a redirect rule, or a classifier that reads the prompt too)
    unresolved: bool | None = None


def _stacked_zeros(cond: Conditioning, n: int) -> Conditioning:
    """float32 zeros of (n, *shape) for every part of ``cond``."""
    return cond.map(lambda t: torch.zeros((n, *t.shape), dtype=torch.float32, device=t.device))


def _masked_sum(deltas: Conditioning, on: torch.Tensor) -> Conditioning:
    """Per part: the sum over K of the (K, B, ...) deltas where ``on`` (K, B) holds."""

    def pick(d: torch.Tensor) -> torch.Tensor:
        return torch.where(on.view(*on.shape, *([1] * (d.ndim - 2))), d, 0.0).sum(0)

    return deltas.map(pick)


@dataclass(frozen=True)
class _Settings:
    """The rules of a group's K_g concepts as (K_g,) tensors on one device (host-built once)."""

    threshold: torch.Tensor
    decide_at_t: torch.Tensor
    redirect_at_t: torch.Tensor
    strength: torch.Tensor
    confirm_checks: torch.Tensor
    escalate: torch.Tensor
    escalate_max: torch.Tensor
    unresolved_after: torch.Tensor
    sticky: torch.Tensor
    escalating: torch.Tensor
    redirect: torch.Tensor
    apply_to_uncond: torch.Tensor
    move_pooled: torch.Tensor
    gates_yield: torch.Tensor
    shift_scale: torch.Tensor
    shift: Conditioning | None
    block: torch.Tensor
    rewind: torch.Tensor


def moves_on(p: _Settings, state: EngineState) -> torch.Tensor:
    """(K_g,) whether the group's rules move what they trigger in this run (a ``redirect`` rule, and
    not a ``rewind`` rule in a rehearsal)."""
    return p.redirect & ~(p.rewind & state.rehearsal)


def judges_unresolved(rule: ConceptRule, config: RedirectorConfig) -> bool:
    """Whether a sample's redirection can be judged unresolved under ``rule`` with a redirector of
    ``config``: a ``redirect`` rule whose classifier reads the latent alone. One that reads the
    prompt too keeps seeing the words, which redirection does not change (the checks read the
    unredirected conditioning)."""
    return rule.action == "redirect" and config.capacity.classifier_reads == "latent"


class _Group:
    """Concepts whose redirectors share one architecture and whose rules share one check schedule
    (window, ``replace_steps``): checked together, as one :class:`StackedRedirectors` call, and
    laid out as adjacent columns ``columns`` of the engine state."""

    def __init__(self, indices: list[int], concepts: list[EngineConcept], start: int):
        self.indices = indices  # positions in the engine's (policy-ordered) concept list
        self.concepts = concepts
        self.columns = slice(start, start + len(concepts))
        self.stack = StackedRedirectors([c.redirector for c in concepts])
        rules = [c.rule for c in concepts]
        self.window = rules[0].window
        self.redirects = any(r.action == "redirect" for r in rules)
        self.acting_uncond = any(r.action == "redirect" and r.apply_to_uncond for r in rules)
        self.blocks = any(r.action == "block" for r in rules)
        self.rewinds = any(r.rewind for r in rules)
        self.moves_late = any(r.redirect_at_t < 1.0 for r in rules)
        self.gates_yield = any(r.gates == "yield" for r in rules)
        self.shifts = any(c.shift is not None for c in concepts)
        self._settings: dict[torch.device, _Settings] = {}
        self.settings(self.stack.device)  # where the redirectors are: no copy inside the loop

    def is_check_step(self, step: int) -> bool:
        return self.concepts[0].is_check_step(step)

    def settings(self, device: torch.device) -> _Settings:
        """The rules' settings on ``device`` (built there once, then reused: no per-step copies)."""
        if device not in self._settings:
            rules = [c.rule for c in self.concepts]

            def column(values: list, dtype: torch.dtype) -> torch.Tensor:  # built on the host, copied async
                return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

            self._settings[device] = _Settings(
                threshold=column([r.threshold for r in rules], torch.float32),
                decide_at_t=column([r.decide_at_t for r in rules], torch.float32),
                # 1 = every step, whatever a backbone's first normalised timestep rounds to
                redirect_at_t=column(
                    [r.redirect_at_t if r.redirect_at_t < 1.0 else float("inf") for r in rules],
                    torch.float32,
                ),
                strength=column([r.strength for r in rules], torch.float32),
                confirm_checks=column([r.confirm_checks for r in rules], torch.int64),
                escalate=column([r.escalate for r in rules], torch.float32),
                escalate_max=column([r.escalate_max for r in rules], torch.float32),
                unresolved_after=column(
                    [
                        r.confirm_checks if judges_unresolved(r, c.redirector.config) else 0
                        for r, c in zip(rules, self.concepts)
                    ],
                    torch.int64,
                ),
                sticky=column([r.sticky for r in rules], torch.bool),
                escalating=column([r.escalate > 1.0 for r in rules], torch.bool),
                redirect=column([r.action == "redirect" for r in rules], torch.bool),
                apply_to_uncond=column(
                    [r.action == "redirect" and r.apply_to_uncond for r in rules], torch.bool
                ),
                move_pooled=column([r.move_pooled for r in rules], torch.bool),
                gates_yield=column([r.gates == "yield" for r in rules], torch.bool),
                shift_scale=column([r.shift.scale if r.shift else 0.0 for r in rules], torch.float32),
                shift=self._stacked_shift(device),
                block=column([r.action == "block" for r in rules], torch.bool),
                rewind=column([r.rewind for r in rules], torch.bool),
            )
        return self._settings[device]

    def _stacked_shift(self, device: torch.device) -> Conditioning | None:
        """The rules' shift directions stacked (K_g, ...) on ``device``, zeros for a rule without."""
        given = [c.shift for c in self.concepts if c.shift is not None]
        if not given:
            return None
        like = given[0]
        rows = [c.shift if c.shift is not None else like.map(torch.zeros_like) for c in self.concepts]
        return Conditioning(
            tuple(
                torch.stack([r.tokens[i] for r in rows]).float().to(device) for i in range(len(like.tokens))
            ),
            None if like.pooled is None else torch.stack([r.pooled for r in rows]).float().to(device),  # type: ignore[misc]
        )


class RedirectionEngine:
    """Applies K concept redirectors to the conditional conditioning of a batch, step by step.

    Concepts are grouped by redirector architecture and check schedule; each group runs as one
    batched computation per check (:mod:`~saferedir_sdk.stacked`), so the work per step grows
    with the number of groups (one for a policy whose bundles share a capacity and schedule), not
    with the number of concepts. The state's columns are in group order (:meth:`column`).
    """

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
        keyed: dict[tuple, list[int]] = {}
        for k, c in enumerate(self.concepts):
            key = (c.redirector.config, c.rule.window, c.rule.replace_steps)
            keyed.setdefault(key, []).append(k)
        self.groups: list[_Group] = []
        self._columns = [0] * len(self.concepts)
        start = 0
        for indices in keyed.values():
            for offset, k in enumerate(indices):
                self._columns[k] = start + offset
            self.groups.append(_Group(indices, [self.concepts[k] for k in indices], start))
            start += len(indices)

    def column(self, k: int) -> int:
        """The state column of concept ``k`` (its position in :attr:`concepts`)."""
        return self._columns[k]

    @property
    def rewinds(self) -> bool:
        """Some rule decides on a first run and redirects on a second (``rewind``)."""
        return any(g.rewinds for g in self.groups)

    def init_state(
        self, cond: Conditioning, flagged: torch.Tensor | None = None, *, rehearsal: bool = False
    ) -> EngineState:
        """Fresh state for a batch shaped like ``cond``. ``flagged`` (B, K) bool, from
        :meth:`flagged` of the call's first run: those samples and concepts start stuck (redirected
        from their first check on). ``rehearsal``: the first run of a call with ``rewind`` rules."""
        b, k, device = cond.batch_size, len(self.concepts), cond.device
        if flagged is not None and tuple(flagged.shape) != (b, k):
            raise TensorShapeError("flagged samples", f"({b}, {k})", tuple(flagged.shape))
        stuck = (
            torch.zeros(b, k, dtype=torch.bool, device=device)
            if flagged is None
            else flagged.to(device=device, dtype=torch.bool).clone()
        )
        return EngineState(
            step=0,
            triggered=torch.zeros(b, k, dtype=torch.bool, device=device),
            hits=torch.zeros(b, k, dtype=torch.int64, device=device),
            stuck=stuck,
            rewound=stuck.clone(),
            deciding=torch.zeros(b, k, dtype=torch.int64, device=device),
            persist=torch.zeros(b, k, dtype=torch.int64, device=device),
            gates_read=torch.zeros(b, k, dtype=torch.bool, device=device),
            opening=torch.zeros(b, k, dtype=torch.bool, device=device),
            opened=torch.zeros(b, k, dtype=torch.bool, device=device),
            boost=torch.ones(b, k, dtype=torch.float32, device=device),
            first_step=torch.full((b, k), -1, dtype=torch.int64, device=device),
            max_score=torch.full((b, k), -1.0, dtype=torch.float32, device=device),
            max_deciding=torch.full((b, k), -1.0, dtype=torch.float32, device=device),
            applied=torch.zeros(b, k, dtype=torch.bool, device=device),
            nonfinite=torch.zeros(b, k, dtype=torch.bool, device=device),
            deltas=[_stacked_zeros(cond, len(g.concepts)) for g in self.groups],
            checks=[0] * k,
            token_shapes=[tuple(t.shape) for t in cond.tokens],
            rehearsal=rehearsal,
        )

    def _check_shapes(
        self, latents: torch.Tensor, cond: Conditioning, state: EngineState, uncond: Conditioning | None
    ) -> None:
        if [tuple(t.shape) for t in cond.tokens] != state.token_shapes:
            raise TensorShapeError(
                "conditional token streams", str(state.token_shapes), tuple(cond.tokens[0].shape)
            )
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
        for g, group in enumerate(self.groups):
            if not group.is_check_step(step):
                continue
            self._check_group(group, state, latents, timestep, cond, step, g)
        state.step = step + 1
        state.timestep = timestep
        new_cond = self._apply(cond, state, step, uncond_side=False)
        new_uncond = None if uncond is None else self._apply(uncond, state, step, uncond_side=True)
        return new_cond, new_uncond, state

    def _check_group(
        self,
        group: _Group,
        state: EngineState,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        step: int,
        g: int,
    ) -> None:
        """One check of every concept of ``group``: one stacked redirector forward, the decisions
        of all its columns as (B, K_g) tensor updates (the rules' settings are (K_g,) tensors)."""
        p = group.settings(latents.device)
        cols = group.columns
        out = group.stack(latents, timestep, cond)
        score = torch.sigmoid(out.logit.float()).T  # (B, K_g)
        finite = torch.isfinite(score)
        t = timestep.float().reshape(-1, 1)  # () or (B,) -> (1 or B, 1)
        decides = (t <= p.decide_at_t).expand_as(score)
        hit = ((score >= p.threshold) & decides) | ~finite  # NaN never reads as "safe"
        state.deciding[:, cols] += decides.long()
        was_on = state.triggered[:, cols].clone()
        # the rule was already moving the sample when this check looked (a rehearsal moves nothing
        # for a rewind rule): a hit now says the redirection has not cleared the concept so far
        moves = moves_on(p, state)  # (K_g,): this run moves what the rule triggers
        moving = was_on & moves
        persist = state.persist[:, cols]
        state.persist[:, cols] = torch.where(decides, torch.where(hit & moving, persist + 1, 0), persist)
        hits, stuck = state.hits[:, cols], state.stuck[:, cols]
        counted = torch.where(hit, hits + 1, torch.where(stuck, hits, 0))
        confirmed = stuck | (counted >= p.confirm_checks)
        # a rewind rule acts on what it confirmed, in either run: an unconfirmed hit moves nothing (in
        # the second run the other samples replay the first run's trajectory, which did not confirm)
        acts = torch.where(p.rewind, confirmed, hit)
        state.hits[:, cols] = torch.where(p.sticky, counted, hits)
        state.stuck[:, cols] = torch.where(p.sticky, confirmed, stuck)
        state.triggered[:, cols] = torch.where(p.sticky, confirmed | acts, acts)
        boost = state.boost[:, cols]
        raised = (boost * p.escalate).clamp(max=p.escalate_max)
        boost = torch.where(hit & was_on & p.escalating, raised, boost)
        state.boost[:, cols] = boost
        first = state.first_step[:, cols]
        state.first_step[:, cols] = torch.where(acts & (first < 0), step, first)
        seen = torch.where(finite, score, -1.0)
        state.max_score[:, cols] = torch.maximum(state.max_score[:, cols], seen)
        state.max_deciding[:, cols] = torch.maximum(
            state.max_deciding[:, cols], torch.where(decides, seen, -1.0)
        )
        for k in group.indices:
            state.checks[k] += 1
        bad = ~finite
        if group.redirects:
            strength = (p.strength * torch.where(p.escalating, boost, 1.0)).T  # (K_g, B)
            if group.gates_yield:
                # the heads' gates are read once, at the first check at which the sample is
                # triggered in a run where the rule moves it (its words, on a latent that shows
                # little yet): shut there, the rule opens them for the rest of the call; open
                # there, they keep the heads' own schedule
                reads = state.triggered[:, cols] & ~state.gates_read[:, cols] & moves
                state.opening[:, cols] |= reads & shut_gates(out).T & p.gates_yield
                state.gates_read[:, cols] |= reads
                out = open_gates(out, state.opening[:, cols].T)
            delta = redirection(cond, out, strength)
            if group.shifts and p.shift is not None:  # the rule's concept shift, at its strength
                shift = shift_delta(cond, p.shift, p.shift_scale.unsqueeze(1) * strength)
                delta = delta.zip_with(shift, torch.add)
            if delta.pooled is not None:
                delta = Conditioning(
                    delta.tokens, torch.where(p.move_pooled.view(-1, 1, 1), delta.pooled, 0.0)
                )
            for part in delta.parts():
                bad = bad | (p.redirect & ~torch.isfinite(part).flatten(2).all(dim=2).T)
            state.deltas[g] = delta.map(lambda d: torch.nan_to_num(d, nan=0.0, posinf=0.0, neginf=0.0))
        state.nonfinite[:, cols] = state.nonfinite[:, cols] | bad

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
        moved: torch.Tensor | None = None
        for g, group in enumerate(self.groups):
            acting = group.acting_uncond if uncond_side else group.redirects
            if not acting or not group.window.contains(step):
                continue
            p = group.settings(state.triggered.device)
            on = state.triggered[:, group.columns] & (p.apply_to_uncond if uncond_side else p.redirect)
            if state.rehearsal:  # a rewind rule only decides in the first run
                on = on & ~p.rewind
            if group.moves_late and state.timestep is not None:  # from its redirect_at_t on
                # "not above": a NaN timestep moves the sample (it never reads as "not yet")
                on = on & ~(state.timestep.float().reshape(-1, 1) > p.redirect_at_t)
            if not uncond_side:
                state.applied[:, group.columns] = state.applied[:, group.columns] | on
                if group.gates_yield:
                    state.opened[:, group.columns] |= on & state.opening[:, group.columns]
            contribution = _masked_sum(state.deltas[g], on.T)
            total = contribution if total is None else total.zip_with(contribution, torch.add)
            moved = on.any(dim=1) if moved is None else moved | on.any(dim=1)
        if total is None or moved is None:
            return target
        shifted = target.zip_with(total, lambda t, d: t + d.to(t.dtype))
        return shifted.where(moved, target)

    def flagged(self, state: EngineState) -> torch.Tensor:
        """(B, K) bool, state columns: the samples each ``rewind`` rule has confirmed (stuck)."""
        out = torch.zeros_like(state.stuck)
        for group in self.groups:
            if group.rewinds:
                p = group.settings(state.stuck.device)
                out[:, group.columns] = state.stuck[:, group.columns] & p.rewind
        return out

    def rehearsal_settled(self, state: EngineState) -> torch.Tensor:
        """0-dim bool: in a rehearsal, every sample is flagged by some ``rewind`` rule, so the rest of
        the first run cannot change what the second does (the guard stops it there)."""
        return self.flagged(state).any(dim=1).all()

    def is_rewind_check_step(self, step: int) -> bool:
        """A ``rewind`` group checks at ``step``: where :meth:`rehearsal_settled` can change."""
        return any(g.rewinds and g.is_check_step(step) for g in self.groups)

    def blocked_now(self, state: EngineState) -> torch.Tensor | None:
        """(B,) bool: the samples a ``block`` rule flags at this point of the call (device tensor,
        no host read), or None when no rule blocks."""
        flagged: torch.Tensor | None = None
        for group in self.groups:  # the rules' device masks: no index list copied per call
            if not group.blocks:
                continue
            p = group.settings(state.triggered.device)
            mine = (state.triggered[:, group.columns] & p.block).any(dim=1)
            flagged = mine if flagged is None else flagged | mine
        return flagged

    def unresolved(self, state: EngineState) -> torch.Tensor:
        """(B, K) bool, state columns: the samples whose last ``confirm_checks`` deciding checks all
        saw the concept while its ``redirect`` rule was already moving them."""
        out = torch.zeros_like(state.stuck)
        for group in self.groups:
            p = group.settings(state.persist.device)
            cols = group.columns
            out[:, cols] = (p.unresolved_after > 0) & (state.persist[:, cols] >= p.unresolved_after)
        return out

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
                state.rewound.to(torch.float64),
                state.deciding.to(torch.float64),
                self.unresolved(state).to(torch.float64),
                state.opened.to(torch.float64),
                state.max_deciding.to(torch.float64),
            ]
        ).cpu()
        first, score, on, boost, bad, moved, rewound, deciding, unresolved, opened, decided = (
            packed[i].tolist() for i in range(11)
        )
        judged = [judges_unresolved(c.rule, c.redirector.config) for c in self.concepts]
        result = []
        for i in range(state.batch_size):
            row = []
            for k, concept in enumerate(self.concepts):
                j = self._columns[k]
                row.append(
                    ConceptDecision(
                        concept=concept.name,
                        checks=state.checks[k],
                        max_score=round(score[i][j], 6) if state.checks[k] else None,
                        triggered=on[i][j] > 0,
                        first_step=int(first[i][j]) if first[i][j] >= 0 else None,
                        escalation=round(boost[i][j], 4),
                        applied=moved[i][j] > 0,
                        nonfinite=bad[i][j] > 0,
                        rewound=rewound[i][j] > 0,
                        deciding_checks=int(deciding[i][j]),
                        unresolved=unresolved[i][j] > 0 if judged[k] else None,
                        gates_opened=opened[i][j] > 0,
                        max_deciding_score=round(decided[i][j], 6) if decided[i][j] >= 0 else None,
                        shift=(
                            round(concept.rule.shift.scale * concept.rule.strength * boost[i][j], 4)
                            if concept.rule.shift is not None and moved[i][j] > 0
                            else None
                        ),
                    )
                )
            result.append(row)
        return result
