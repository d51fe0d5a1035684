"""Typed errors. Each one names the file, key or tensor at fault and what was expected."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SafeRedirError(Exception):
    """Base class of every error the SDK raises on purpose."""


# --- policies -------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyIssue:
    """One problem in a policy file: where (dotted key path, YAML line) and what."""

    loc: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = self.loc or "<document>"
        if self.line is not None:
            where += f" (line {self.line})"
        return f"{where}: {self.message}"


class PolicyError(SafeRedirError):
    """A policy file could not be read or does not match the schema."""

    #: at most this many issues are spelt out in the message (all stay in ``issues``), each cut to
    #: ``MAX_ISSUE_CHARS``: a hostile document cannot make the message large
    MAX_LISTED = 20
    MAX_ISSUE_CHARS = 300

    def __init__(self, path: str | Path, issues: list[PolicyIssue]):
        self.path = str(path)
        self.issues = list(issues)
        shown = [str(issue) for issue in self.issues[: self.MAX_LISTED]]
        shown = [
            s if len(s) <= self.MAX_ISSUE_CHARS else s[: self.MAX_ISSUE_CHARS - 4] + " ..." for s in shown
        ]
        n = len(self.issues)
        if n > self.MAX_LISTED:
            shown.append(f"... and {n - self.MAX_LISTED} more")
        lines = "\n".join(f"  - {line}" for line in shown)
        super().__init__(f"invalid policy {self.path[:300]} ({n} problem{'s' if n != 1 else ''}):\n{lines}")


# --- redirector bundles ---------------------------------------------------------------------


class BundleError(SafeRedirError):
    """A redirector bundle could not be used. ``path`` names the file."""

    def __init__(self, path: str | Path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class BundleNotFoundError(BundleError):
    """The bundle file does not exist."""


class BundleFormatError(BundleError):
    """The file is not a readable saferedir bundle: not safetensors, truncated, missing or bad metadata,
    tensors that do not match the architecture in its config."""


class BundleIntegrityError(BundleError):
    """The file's sha256 differs from the one the policy pins."""

    def __init__(self, path: str | Path, expected: str, actual: str):
        self.expected = expected
        self.actual = actual
        super().__init__(path, f"sha256 mismatch: the policy pins {expected}, the file has {actual}")


class BundleConceptMismatchError(BundleError):
    """The bundle was trained for another concept or category than the policy rule that uses it."""

    def __init__(self, path: str | Path, field: str, expected: str, actual: str):
        self.field = field
        self.expected = expected
        self.actual = actual
        super().__init__(
            path, f"trained for {field} {actual!r}, but the policy rule governs {field} {expected!r}"
        )


class BundleRuleMismatchError(BundleError):
    """The bundle cannot do what its policy rule asks of it."""

    def __init__(self, path: str | Path, concept: str, message: str):
        self.concept = concept
        super().__init__(path, f"concept '{concept}': {message}")


class BackboneMismatchError(BundleError):
    """The bundle was trained for another backbone (token dim, sequence length, latent channels,
    tokenizer or text-encoder weights)."""

    def __init__(self, path: str | Path, field: str, expected: Any, actual: Any, hint: str = ""):
        self.field = field
        self.expected = expected
        self.actual = actual
        super().__init__(
            path,
            f"backbone mismatch on '{field}': the bundle was trained for {expected!r}, "
            f"the pipeline has {actual!r}" + (f"; {hint}" if hint else ""),
        )


# --- plugins and adapters -------------------------------------------------------------------


class PluginError(SafeRedirError):
    """A plugin is missing, or answered a hook with something unusable."""


class AdapterNotFoundError(PluginError):
    """No installed adapter knows how to guard this pipeline."""


class ComponentWeightsError(SafeRedirError):
    """Weights for a pipeline component (an edited, pre-unlearned UNet or text encoder) cannot be
    loaded: the file is missing or not safetensors, its tensors do not fit the module, or the
    pipeline is wrapped (load before ``wrap``)."""


# --- enforcement ----------------------------------------------------------------------------


class GuardBuildError(SafeRedirError):
    """A guard cannot be built: under ``fail_mode: closed`` any concept that cannot be enforced
    stops construction."""


class EnforcementError(SafeRedirError):
    """The guard could not enforce its policy during a call (``fail_mode: closed``): no output is
    returned."""


class AuditWriteError(SafeRedirError):
    """One or more audit sinks could not write a record (every sink was tried). ``failures`` holds
    (sink name, exception) pairs."""

    def __init__(self, failures: list[tuple[str, BaseException]]):
        self.failures = list(failures)
        parts = "; ".join(f"{name}: {type(exc).__name__}: {str(exc)[:200]}" for name, exc in self.failures)
        super().__init__(f"audit sink(s) failed: {parts}")


class TensorShapeError(SafeRedirError):
    """A tensor handed to the engine or a redirector has the wrong shape."""

    def __init__(self, name: str, expected: str, actual: tuple[int, ...]):
        self.name = name
        self.expected = expected
        self.actual = tuple(actual)
        super().__init__(f"{name}: expected shape {expected}, got {tuple(actual)}")


class GenerationBlocked(SafeRedirError):
    """Raised by a guarded call when a ``block`` rule fired and the policy says ``block.mode: raise``.

    ``report`` is the per-sample :class:`~saferedir_sdk.guard.CallReport` of the call.
    """

    def __init__(self, report: Any):
        self.report = report
        blocked = [s.index for s in report.samples if s.action == "blocked"]
        super().__init__(
            f"generation blocked by policy for sample(s) {blocked} (request {report.request_id})"
        )


class MissingDependencyError(SafeRedirError):
    """An optional dependency a feature needs is not installed; the message names the extra."""
