"""The guard: :class:`SafeRedirGuard` (wrap, hook, per-call orchestration), policy resolution
(:mod:`.resolve`) and the per-call report (:mod:`.report`)."""

from .guard import SafeRedirGuard
from .report import CallReport, ConceptReport, Outcome, SampleAction, SampleReport

__all__ = ["CallReport", "ConceptReport", "Outcome", "SafeRedirGuard", "SampleAction", "SampleReport"]
