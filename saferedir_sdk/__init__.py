"""saferedir-sdk: policy-driven content safety for text-to-image diffusion pipelines (SafeRedir)."""

from .adapter import Adapter, CallInfo, DenoiserInputs
from .bundle import ConceptInfo, RedirectorBundle, load_bundle, save_bundle
from .concepts import ConceptSpec
from .engine import EngineConcept, EngineState, RedirectionEngine
from .errors import (
    AdapterNotFoundError,
    BackboneMismatchError,
    BundleError,
    BundleFormatError,
    BundleIntegrityError,
    BundleNotFoundError,
    EnforcementError,
    GenerationBlocked,
    GuardBuildError,
    PluginError,
    PolicyError,
    SafeRedirError,
    TensorShapeError,
)
from .fingerprint import BackboneFingerprint
from .guard import CallReport, ConceptReport, SafeRedirGuard, SampleReport
from .hookspecs import hookimpl
from .policy import LoadedPolicy, Policy, load_policy
from .redirector import Redirector, RedirectorConfig

__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdapterNotFoundError",
    "BackboneFingerprint",
    "BackboneMismatchError",
    "BundleError",
    "BundleFormatError",
    "BundleIntegrityError",
    "BundleNotFoundError",
    "CallInfo",
    "CallReport",
    "ConceptInfo",
    "ConceptReport",
    "ConceptSpec",
    "DenoiserInputs",
    "EnforcementError",
    "EngineConcept",
    "EngineState",
    "GenerationBlocked",
    "GuardBuildError",
    "LoadedPolicy",
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
    "hookimpl",
    "load_bundle",
    "load_policy",
    "save_bundle",
]
