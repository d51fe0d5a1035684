"""The per-call report: a pure function of what the engine decided and the call's facts.

A :class:`CallReport` is what the caller gets (``guard.last_report``) and what the audit record
holds; building it reads no global state and touches no tensor beyond the engine's one host read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..engine import ConceptDecision
from ..policy import Action, ConceptRule

SampleAction = Literal["none", "monitored", "redirected", "blocked"]
Outcome = Literal["ok", "redirected", "blocked", "error"]

_ACTION_OF_RULE: dict[Action, SampleAction] = {
    "monitor": "monitored",
    "redirect": "redirected",
    "block": "blocked",
}
_ACTION_RANK: dict[SampleAction, int] = {"none": 0, "monitored": 1, "redirected": 2, "blocked": 3}


@dataclass(frozen=True)
class ConceptReport:
    """One concept's outcome for one sample."""

    concept: str
    category: str
    rule_action: Action
    checks: int
    max_score: float | None  # at any check, also one above the rule's decide_at_t (which cannot trigger)
    triggered: bool  # still triggered when the call ended (a released trigger keeps its first_step)
    first_step: int | None
    escalation: float = 1.0  # the strength multiplier escalation reached
    applied: bool = False  # a redirect rule moved the sample at some step (also a released trigger)
    rewound: bool = False  # a rewind rule flagged it in the call's first run; regenerated redirected
    # the redirection did not clear it: its last confirm_checks deciding checks, all made while the
    # rule was moving the sample, still saw the concept (None: cannot be told, see engine)
    unresolved: bool | None = None
    withheld: bool = False  # unresolved under a rule whose `unresolved` is block: the image is withheld
    gates_opened: bool = False  # under gates: yield, the move went through gates the heads had shut
    # the highest p(unsafe) at a check that could trigger (at or below decide_at_t; of either run of a
    # rewound call); None where no such check ran. A max_score above the threshold with this below
    # it: the concept was seen only where the rule does not decide
    max_deciding_score: float | None = None
    # the concept shift that moved it: the share of each token state's norm at its final strength
    # (the rule's shift scale x strength x escalation); None where no shift moved it
    shift: float | None = None


@dataclass(frozen=True)
class SampleReport:
    """What happened to one sample (image) of a call: the strongest action of its triggered rules."""

    index: int
    prompt_index: int
    prompt: str | None
    action: SampleAction
    concepts: list[ConceptReport]


@dataclass(frozen=True)
class CallReport:
    """The per-sample report of one guarded call; the same facts as its audit record."""

    request_id: str
    outcome: Outcome
    samples: list[SampleReport]
    steps: int
    cfg: bool | None
    latency_ms: float
    fail_open: list[dict[str, str]]
    error: dict[str, str] | None = None
    rehearsed_steps: int = 0  # rewind: denoising steps of the first run, redone in the second
    # conditioning beside the prompt the denoiser received (an IP-Adapter image prompt, GLIGEN
    # grounding, an unCLIP image embedding): withheld from each redirected sample where it moved
    side_conditioning: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def blocked(self) -> list[int]:
        """Indices of the samples a ``block`` rule flagged, or whose redirection did not clear a
        concept whose rule withholds such images (``unresolved: block``)."""
        return [s.index for s in self.samples if s.action == "blocked"]


def sample_action(concepts: Sequence[ConceptReport]) -> SampleAction:
    """The strongest action among the rules that triggered at the end or, for redirect rules, moved
    the sample at some step (block > redirect > monitor), else none: a released redirection
    changed the image, so its sample reports ``redirected``. A redirection that did not clear its
    concept under ``unresolved: block`` (``withheld``) blocks the sample."""
    if any(c.withheld for c in concepts):
        return "blocked"
    return max(
        (_ACTION_OF_RULE[c.rule_action] for c in concepts if c.triggered or c.applied),
        key=_ACTION_RANK.__getitem__,
        default="none",
    )


def call_outcome(samples: Sequence[SampleReport], error: BaseException | None) -> Outcome:
    if error is not None:
        return "error"
    if any(s.action == "blocked" for s in samples):
        return "blocked"
    if any(s.action == "redirected" for s in samples):
        return "redirected"
    return "ok"


def build_report(
    *,
    request_id: str,
    decisions: list[list[ConceptDecision]] | None,
    rules: Sequence[ConceptRule],
    prompts: list[str] | None,
    num_images_per_prompt: int,
    batch_size: int | None,
    steps: int,
    cfg: bool | None,
    fail_open: list[dict[str, str]],
    error: BaseException | None,
    latency_ms: float,
    render_prompt: Callable[[str | None], str | None],
    redact: Callable[[str], str] = lambda message: message,
    rehearsed_steps: int = 0,
    side_conditioning: Sequence[str] = (),
) -> CallReport:
    """The report of one call.

    ``decisions``: the engine's per-sample, per-concept outcome, or None when no denoiser call ran
    (then every sample of ``batch_size`` reports its concepts unchecked). ``rules``: the enforced
    rules in the engine's order. ``render_prompt``: how a prompt may appear (the audit settings);
    ``redact``: applied to the error message (prompt text scrubbed unless prompts are logged raw).
    """
    by_name = {r.concept: r for r in rules}
    if decisions is None:
        decisions = [
            [ConceptDecision(r.concept, 0, None, False, None) for r in rules] for _ in range(batch_size or 0)
        ]
    samples = []
    for index, row in enumerate(decisions):
        prompt_index = index // max(1, num_images_per_prompt)
        prompt = prompts[prompt_index] if prompts is not None and prompt_index < len(prompts) else None
        concepts = [
            ConceptReport(
                concept=d.concept,
                category=by_name[d.concept].category,
                rule_action=by_name[d.concept].action,
                checks=d.checks,
                max_score=d.max_score,
                triggered=d.triggered,
                first_step=d.first_step,
                escalation=d.escalation,
                applied=d.applied,
                rewound=d.rewound,
                unresolved=d.unresolved,
                withheld=bool(d.unresolved) and by_name[d.concept].unresolved == "block",
                gates_opened=d.gates_opened,
                max_deciding_score=d.max_deciding_score,
                shift=d.shift,
            )
            for d in row
        ]
        samples.append(
            SampleReport(index, prompt_index, render_prompt(prompt), sample_action(concepts), concepts)
        )
    return CallReport(
        request_id=request_id,
        outcome=call_outcome(samples, error),
        samples=samples,
        steps=steps,
        cfg=cfg,
        latency_ms=round(latency_ms, 3),
        fail_open=list(fail_open),
        rehearsed_steps=rehearsed_steps,
        side_conditioning=list(side_conditioning),
        error={"type": type(error).__name__, "message": redact(str(error))[:2000]}
        if error is not None
        else None,
    )
