"""From a policy to what can be enforced: load every rule's bundles, then pick per pipeline the
bundle trained for its backbone. What cannot be enforced stops the guard under ``fail_mode:
closed`` and becomes a ``fail_open`` entry (recorded in every audit record) under ``open``."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pluggy
import torch

from ..bundle import RedirectorBundle, classified_below, load_bundle
from ..concepts import ConceptSpec
from ..conditioning import Conditioning
from ..engine import EngineConcept, judges_unresolved
from ..errors import (
    BackboneMismatchError,
    BundleConceptMismatchError,
    BundleRuleMismatchError,
    GuardBuildError,
    PluginError,
    SafeRedirError,
)
from ..fingerprint import BackboneFingerprint
from ..plugins import concept_registry, not_loaded_note, plugin_distribution
from ..policy import ConceptRule, LoadedPolicy
from ..redirector import Redirector, shift_direction

FailOpen = dict[str, str]  # {"concept", "reason"}


@dataclass(frozen=True)
class ResolvedConcept:
    """An effective rule, every bundle that could enforce it (one per backbone), and where they came
    from (``"file"``, or ``"plugin NAME (DIST VERSION)"``)."""

    rule: ConceptRule
    bundles: list[RedirectorBundle]
    source: str = "file"


@dataclass(frozen=True)
class Resolution:
    """What a policy resolves to: the concepts with loaded bundles, and those that failed open."""

    concepts: list[ResolvedConcept]
    fail_open: list[FailOpen]


def cannot_enforce(
    loaded: LoadedPolicy, concept: str, exc: Exception, closed_error: type[SafeRedirError] | None
) -> FailOpen:
    """Under ``closed`` raise (``closed_error`` wrapping ``exc``, or ``exc`` itself if None); under
    ``open`` warn and return the fail_open entry."""
    policy = loaded.policy
    if policy.fail_mode == "closed":
        if closed_error is None:
            raise exc
        raise closed_error(
            f"policy '{policy.name}' ({loaded.path}): concept '{concept}' cannot be enforced "
            f"and fail_mode is closed: {exc}"
        ) from exc
    warnings.warn(f"saferedir: concept '{concept}' is NOT enforced (fail_mode: open): {exc}", stacklevel=4)
    return {"concept": concept, "reason": f"{type(exc).__name__}: {exc}"}


def _plugin_bundles(
    rule: ConceptRule, registry: dict[str, tuple[ConceptSpec, str]], pm: pluggy.PluginManager
) -> tuple[list[RedirectorBundle], str]:
    ref = rule.redirector
    found = registry.get(str(ref.plugin))
    if found is None:
        raise PluginError(
            f"no loaded plugin registers concept '{ref.plugin}' (registered: {sorted(registry) or 'none'}"
            f"{not_loaded_note(pm)}); install the pack that ships it, or start one: saferedir plugins new "
            f"{ref.plugin} --words ... --neighbours ..."
        )
    spec, plugin = found
    if not spec.bundles:
        raise PluginError(
            f"plugin concept '{ref.plugin}' ships no trained bundle yet: train one for your backbone with "
            f"saferedir train --backbone FOLDER --pairs plugin:{ref.plugin} --concept {rule.concept} "
            f"--category {rule.category} --out PACK/bundles/{ref.plugin}.BACKBONE.safetensors, then reinstall the pack"
        )
    bundles = []
    for path in spec.bundles:
        bundle = load_bundle(path)
        if ref.sha256 is None or bundle.sha256 == ref.sha256:
            bundles.append(bundle)
    if not bundles:  # re-raise the integrity error of the first file, naming it and both hashes
        load_bundle(spec.bundles[0], sha256=ref.sha256)
    return bundles, f"plugin {plugin} ({plugin_distribution(pm, plugin)})"


def _check_concept(rule: ConceptRule, bundle: RedirectorBundle) -> None:
    """A rule is enforced only by a bundle trained for its concept and category: a rule named
    ``nudity`` that points at a bundle trained for ``red`` would enforce the wrong thing."""
    for field, wanted, actual in (
        ("concept", rule.concept, bundle.concept.name),
        ("category", rule.category, bundle.concept.category),
    ):
        if wanted != actual:
            raise BundleConceptMismatchError(bundle.path or "<bundle>", field, wanted, actual)
    below = classified_below(bundle)
    if rule.decide_at_t > below:
        raise BundleRuleMismatchError(
            bundle.path or "<bundle>",
            rule.concept,
            f"its classifier was trained only at normalised timesteps <= {below} (saferedir train "
            f"--classify-below), the rule decides from decide_at_t {rule.decide_at_t}: its scores "
            f"above {below} mean nothing. Set decide_at_t <= {below}",
        )
    if rule.unresolved == "block" and not judges_unresolved(rule, bundle.config):
        raise BundleRuleMismatchError(
            bundle.path or "<bundle>",
            rule.concept,
            f"the rule's `unresolved: block` needs a classifier that reads the latent alone "
            f"(classifier_reads: latent; saferedir train --classifier-reads latent), this one reads {bundle.config.capacity.classifier_reads}: "
            "it keeps seeing the prompt's words, which redirection does not change",
        )


def resolve_policy(loaded: LoadedPolicy, pm: pluggy.PluginManager) -> Resolution:
    """Load the bundles of every rule of ``loaded`` (plugins are asked only if a rule names one)."""
    concepts: list[ResolvedConcept] = []
    fail_open: list[FailOpen] = []
    registry: dict[str, tuple[ConceptSpec, str]] | None = None
    for rule in loaded.policy.effective_rules():
        ref = rule.redirector
        source = "file"
        try:
            if ref.path is not None:
                path = Path(ref.path)
                bundles = [
                    load_bundle(path if path.is_absolute() else loaded.folder / path, sha256=ref.sha256)
                ]
            else:
                registry = registry if registry is not None else concept_registry(pm)
                bundles, source = _plugin_bundles(rule, registry, pm)
            for bundle in bundles:
                _check_concept(rule, bundle)
        except SafeRedirError as exc:
            fail_open.append(cannot_enforce(loaded, rule.concept, exc, GuardBuildError))
            continue
        concepts.append(ResolvedConcept(rule, bundles, source))
    return Resolution(concepts, fail_open)


@dataclass(frozen=True)
class Matched:
    """What enforces a policy on one backbone: the engine's concepts, what failed open, and per
    enforced concept which bundle (sha256, file name, source) -- as every audit record says."""

    enforced: list[EngineConcept]
    fail_open: list[FailOpen]
    bundles: list[dict[str, str]]
    mismatches: list[dict[str, str]]  # encoder_mismatch: warn, per concept and changed encoder


#: an adapter's ``encode_prompts``: prompts -> their conditioning and real-token mask
Encode = Callable[[list[str]], "tuple[Conditioning, torch.Tensor]"]


def concept_shift(rule: ConceptRule, redirector: Redirector, encode: Encode, device: object) -> Conditioning:
    """The unit direction of ``rule``'s ``shift`` in the backbone's encoder space (``encode``: the
    pipeline's own), on ``device``; its pooled part only where ``redirector`` moves a pooled embedding.

    Raises:
        GuardBuildError: the two lists give no direction (it names the concept's ``shift`` key).
    """
    shift = rule.shift
    if shift is None:
        raise ValueError(f"concept '{rule.concept}': the rule has no shift")
    with torch.no_grad():
        unsafe, unsafe_real = encode(list(shift.unsafe))
        safe, safe_real = encode(list(shift.safe))
    try:
        direction = shift_direction(unsafe, unsafe_real, safe, safe_real)
    except ValueError as exc:
        raise GuardBuildError(f"concept '{rule.concept}': shift: {exc}") from exc
    if not redirector.config.pooled_dim:
        direction = Conditioning(direction.tokens)
    return direction.map(lambda d: d.to(device))  # type: ignore[arg-type]


def match_backbone(
    loaded: LoadedPolicy,
    resolution: Resolution,
    fingerprint: BackboneFingerprint,
    device: object,
    encode: Encode | None = None,
) -> Matched:
    """Per resolved concept, the bundle trained for ``fingerprint`` (moved to ``device``); a concept
    with none stops the wrap under ``closed`` (:class:`BackboneMismatchError`) or fails open. A rule
    with a ``shift`` gets its direction from ``encode`` (the pipeline's ``encode_prompts``); one
    whose direction cannot be made stops the wrap under ``closed`` or fails open."""
    enforced: list[EngineConcept] = []
    fail_open: list[FailOpen] = []
    bundles: list[dict[str, str]] = []
    mismatches: list[dict[str, str]] = []
    for resolved in resolution.concepts:
        match = next((b for b in resolved.bundles if b.backbone.first_difference(fingerprint) is None), None)
        if match is None and resolved.rule.encoder_mismatch == "warn":
            match = next((b for b in resolved.bundles if b.backbone.weight_differences(fingerprint)), None)
            for encoder, trained, actual in match.backbone.weight_differences(fingerprint) if match else []:
                mismatches.append(
                    {
                        "concept": resolved.rule.concept,
                        "encoder": encoder,
                        "bundle": trained,
                        "pipeline": actual,
                    }
                )
                warnings.warn(
                    f"saferedir: concept '{resolved.rule.concept}' is enforced by a bundle trained for other "
                    f"'{encoder}' weights (encoder_mismatch: warn); every audit record says so",
                    stacklevel=4,
                )
        if match is None:
            first = resolved.bundles[0]
            diff = first.backbone.first_difference(fingerprint) or ("backbone", "?", "?")
            hint = ""
            if resolved.source != "file":  # a pack without a bundle for this backbone: say how to make one
                rule = resolved.rule
                hint = (
                    f"none of the {len(resolved.bundles)} bundle(s) of {resolved.source} fits this backbone: "
                    f"train one with saferedir train --backbone PIPELINE_FOLDER --pairs plugin:{rule.redirector.plugin} "
                    f"--concept {rule.concept} --category {rule.category} --out FILE"
                )
            error = BackboneMismatchError(first.path or "<bundle>", *diff, hint=hint)
            fail_open.append(cannot_enforce(loaded, resolved.rule.concept, error, None))
            continue
        redirector = match.redirector.to(device)  # type: ignore[arg-type]
        shift = None
        if resolved.rule.shift is not None:
            try:
                if encode is None:
                    raise GuardBuildError(
                        f"concept '{resolved.rule.concept}': shift needs the pipeline's text encoder"
                    )
                shift = concept_shift(resolved.rule, redirector, encode, device)
            except GuardBuildError as exc:
                fail_open.append(cannot_enforce(loaded, resolved.rule.concept, exc, None))
                continue
        enforced.append(EngineConcept(resolved.rule, redirector, shift))
        bundles.append(
            {
                "concept": resolved.rule.concept,
                "sha256": match.sha256,
                "file": match.path.name if match.path is not None else "<bundle>",
                "source": resolved.source,
            }
        )
    return Matched(enforced, fail_open, bundles, mismatches)
