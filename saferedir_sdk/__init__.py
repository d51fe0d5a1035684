"""saferedir-sdk: policy-driven content safety for text-to-image diffusion pipelines (SafeRedir).

Names are imported on first use, so ``import saferedir_sdk`` (and the ``saferedir`` command's
policy tools) cost no torch import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "Adapter": "adapter",
    "CallInfo": "adapter",
    "DenoiserInputs": "adapter",
    "ConceptInfo": "concepts",
    "ConceptSpec": "concepts",
    "PackFiles": "concepts",
    "CATEGORIES": "concepts",
    "Conditioning": "conditioning",
    "TokenStream": "conditioning",
    "RedirectorBundle": "bundle",
    "load_bundle": "bundle",
    "save_bundle": "bundle",
    "upgrade_bundle": "bundle",
    "EngineConcept": "engine",
    "EngineState": "engine",
    "RedirectionEngine": "engine",
    "AdapterNotFoundError": "errors",
    "BackboneMismatchError": "errors",
    "BundleConceptMismatchError": "errors",
    "BundleError": "errors",
    "BundleFormatError": "errors",
    "BundleIntegrityError": "errors",
    "BundleNotFoundError": "errors",
    "BundleRuleMismatchError": "errors",
    "EnforcementError": "errors",
    "GenerationBlocked": "errors",
    "GuardBuildError": "errors",
    "MissingDependencyError": "errors",
    "PluginError": "errors",
    "PolicyError": "errors",
    "SafeRedirError": "errors",
    "TensorShapeError": "errors",
    "BackboneFingerprint": "fingerprint",
    "TextEncoderPrint": "fingerprint",
    "CallReport": "guard",
    "ConceptReport": "guard",
    "SafeRedirGuard": "guard",
    "SampleReport": "guard",
    "hookimpl": "hookspecs",
    "ConceptRule": "policy",
    "LoadedPolicy": "policy",
    "Policy": "policy",
    "load_policy": "policy",
    "Capacity": "capacity",
    "Redirector": "redirector",
    "RedirectorConfig": "redirector",
}

__all__ = [
    "Adapter",
    "AdapterNotFoundError",
    "BackboneFingerprint",
    "BackboneMismatchError",
    "BundleConceptMismatchError",
    "BundleError",
    "BundleFormatError",
    "BundleIntegrityError",
    "BundleNotFoundError",
    "BundleRuleMismatchError",
    "CATEGORIES",
    "CallInfo",
    "CallReport",
    "Capacity",
    "ConceptInfo",
    "ConceptReport",
    "ConceptRule",
    "ConceptSpec",
    "PackFiles",
    "Conditioning",
    "DenoiserInputs",
    "EnforcementError",
    "EngineConcept",
    "EngineState",
    "GenerationBlocked",
    "GuardBuildError",
    "LoadedPolicy",
    "MissingDependencyError",
    "PluginError",
    "Policy",
    "PolicyError",
    "RedirectionEngine",
    "Redirector",
    "RedirectorBundle",
    "RedirectorConfig",
    "SafeRedirError",
    "SafeRedirGuard",
    "SampleReport",
    "TensorShapeError",
    "TextEncoderPrint",
    "TokenStream",
    "hookimpl",
    "load_bundle",
    "load_policy",
    "save_bundle",
    "upgrade_bundle",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'saferedir_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .adapter import Adapter, CallInfo, DenoiserInputs
    from .bundle import RedirectorBundle, load_bundle, save_bundle, upgrade_bundle
    from .capacity import Capacity
    from .concepts import CATEGORIES, ConceptInfo, ConceptSpec, PackFiles
    from .conditioning import Conditioning, TokenStream
    from .engine import EngineConcept, EngineState, RedirectionEngine
    from .errors import (
        AdapterNotFoundError,
        BackboneMismatchError,
        BundleConceptMismatchError,
        BundleError,
        BundleFormatError,
        BundleIntegrityError,
        BundleNotFoundError,
        BundleRuleMismatchError,
        EnforcementError,
        GenerationBlocked,
        GuardBuildError,
        MissingDependencyError,
        PluginError,
        PolicyError,
        SafeRedirError,
        TensorShapeError,
    )
    from .fingerprint import BackboneFingerprint, TextEncoderPrint
    from .guard import CallReport, ConceptReport, SafeRedirGuard, SampleReport
    from .hookspecs import hookimpl
    from .policy import ConceptRule, LoadedPolicy, Policy, load_policy
    from .redirector import Redirector, RedirectorConfig
