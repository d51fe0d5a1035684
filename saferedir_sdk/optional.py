"""Optional dependencies: imported where a feature needs them, with a one-line error naming the
extra that installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError


def require(module: str, *, extra: str, feature: str, distribution: str = "saferedir-sdk") -> ModuleType:
    """``import module``, or :class:`MissingDependencyError` saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or module
        raise MissingDependencyError(
            f"{feature} needs '{missing}', which is not installed: pip install '{distribution}[{extra}]'"
        ) from None


def optional(module: str) -> ModuleType | None:
    """``import module``, or None when it is not installed (for features that work without it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
