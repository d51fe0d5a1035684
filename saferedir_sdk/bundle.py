"""Redirector bundle files: one ``.safetensors`` file per trained redirector.

The tensors are the redirector's state dict (float32); the safetensors metadata (string -> string)
holds:

=============================  ====================================================================
``saferedir.format``           ``"saferedir-redirector"``
``saferedir.version``          format version (``"2"``)
``saferedir.config``           JSON of :class:`RedirectorConfig` (the architecture)
``saferedir.concept``          JSON ``{"name", "category", "description"}``
``saferedir.backbone``         JSON of the :class:`BackboneFingerprint` it was trained for
``saferedir.training``         JSON training summary (data sizes, accuracies, time, versions);
                               an ensemble's (:func:`ensemble_bundle`) is its base's plus
                               ``ensemble``: each joined classifier's sha256 and training summary
``saferedir.upgraded_from``    only on files written by :func:`upgrade_bundle`: the old file's
                               format version and sha256
=============================  ====================================================================

Format history: version 1 (SDK 0.1) had one token stream, raw 0..999 timesteps and a flat
fingerprint; version 2 has token streams, an optional pooled head, normalised timesteps and one
fingerprint entry per text encoder. A version-1 file is refused with a :class:`BundleFormatError`
that says how to convert it (``saferedir bundle upgrade OLD NEW``): the conversion is exact (same
weights, same outputs), but it is never done silently.

Loading checks all of it and raises a typed :class:`~saferedir_sdk.errors.BundleError` subclass
naming the file and the mismatch. Never pickle: only safetensors is read or written. The
``sha256`` of the file is what policies pin.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path
from .concepts import ConceptInfo
from .errors import BackboneMismatchError, BundleFormatError, BundleIntegrityError, BundleNotFoundError
from .fingerprint import BackboneFingerprint
from .redirector import Redirector, RedirectorConfig

FORMAT_NAME = "saferedir-redirector"
FORMAT_VERSION = 2
#: no weight of a trained redirector comes near this (the shipped ones stay below 3): a larger
#: value is a corrupted or hostile file, refused before it can saturate every decision
MAX_ABS_WEIGHT = 1e4


@dataclass
class RedirectorBundle:
    """A loaded bundle: the module in eval mode plus everything its metadata said."""

    redirector: Redirector
    concept: ConceptInfo
    backbone: BackboneFingerprint
    training: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    @property
    def config(self) -> RedirectorConfig:
        return self.redirector.config

    def check_backbone(self, fingerprint: BackboneFingerprint) -> None:
        """Raise :class:`BackboneMismatchError` if this bundle was trained for another backbone."""
        diff = self.backbone.first_difference(fingerprint)
        if diff is not None:
            raise BackboneMismatchError(self.path or "<in-memory bundle>", *diff)


def classified_below(bundle: RedirectorBundle) -> float:
    """The normalised timestep at or below which the bundle's classifier was trained
    (``saferedir train --classify-below``; 1: every noise level). Read from its training history:
    the latest fit that trained the decision (a ``trainable: redirection`` fit keeps its init's); for
    an ensemble (:func:`ensemble_bundle`) the lowest of its members'.
    :class:`BundleFormatError` where that history names something other than a level in (0, 1], or
    an ensemble's history does not record each of its members."""
    path = bundle.path or "<in-memory bundle>"
    below = _classified_below(bundle.training, path)
    extra = bundle.config.capacity.classifier_members - 1
    if extra:
        ensemble = bundle.training.get("ensemble")
        members = ensemble.get("members") if isinstance(ensemble, dict) else None
        if (
            not isinstance(members, list)
            or len(members) != extra
            or not all(isinstance(m, dict) for m in members)
        ):
            raise BundleFormatError(
                path,
                f"training history: 'ensemble.members' must record the {extra} classifier(s) joined to "
                f"the first (saferedir bundle ensemble), got {members!r:.200}",
            )
        below = min([below, *(_classified_below(m.get("training"), path) for m in members)])
    return below


def _classified_below(record: Any, path: str | Path) -> float:
    """:func:`classified_below` of one fit's training record (and the inits it records)."""
    config = record.get("config") if isinstance(record, dict) else None
    while isinstance(config, dict):
        if config.get("trainable", "all") != "redirection":
            below = config.get("classify_below", 1.0)
            if isinstance(below, bool) or not isinstance(below, int | float) or not 0.0 < below <= 1.0:
                raise BundleFormatError(
                    path, f"training history: classify_below expected a number in (0, 1], got {below!r}"
                )
            return float(below)
        record = record.get("init") if isinstance(record, dict) else None
        config = record.get("training_config") if isinstance(record, dict) else None
    return 1.0


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_fits(config: RedirectorConfig, backbone: BackboneFingerprint) -> str | None:
    """Why ``config`` cannot belong to ``backbone``, or None."""
    if config.streams != backbone.streams or config.latent_channels != backbone.latent_channels:
        return (
            f"the architecture (streams {[(s.name, s.seq_len, s.dim) for s in config.streams]}, "
            f"{config.latent_channels} latent channels) and the backbone fingerprint (streams "
            f"{[(s.name, s.seq_len, s.dim) for s in backbone.streams]}, {backbone.latent_channels}) disagree"
        )
    if config.pooled_dim not in (0, backbone.pooled_dim):
        return f"the redirector reads a {config.pooled_dim}-d pooled embedding, the backbone has {backbone.pooled_dim}"
    return None


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return file_sha256(path)


def save_bundle(
    path: str | Path,
    redirector: Redirector,
    concept: ConceptInfo,
    backbone: BackboneFingerprint,
    training: dict[str, Any] | None = None,
) -> str:
    """Write a bundle atomically (temporary file, then rename) and return its sha256."""
    problem = _check_fits(redirector.config, backbone)
    if problem is not None:
        raise ValueError(f"cannot write {path}: {problem}")
    metadata = {
        "saferedir.format": FORMAT_NAME,
        "saferedir.version": str(FORMAT_VERSION),
        "saferedir.config": json.dumps(redirector.config.to_dict(), sort_keys=True),
        "saferedir.concept": json.dumps(
            {"name": concept.name, "category": concept.category, "description": concept.description}
        ),
        "saferedir.backbone": json.dumps(backbone.to_dict(), sort_keys=True),
        "saferedir.training": json.dumps(training or {}, sort_keys=True, default=str),
    }
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous() for k, v in redirector.state_dict().items()
    }
    return _write(Path(path), tensors, metadata)


def _json_field(path: Path, metadata: dict[str, str], key: str) -> dict[str, Any]:
    """Metadata ``key`` as a JSON object (anything else is a :class:`BundleFormatError`)."""
    if key not in metadata:
        raise BundleFormatError(path, f"metadata key '{key}' is missing")
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise BundleFormatError(path, f"metadata key '{key}' is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise BundleFormatError(
            path, f"metadata key '{key}': expected a JSON object, got {type(value).__name__}"
        )
    return value


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise BundleNotFoundError(path, "no such bundle file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleFormatError(path, f"not a readable safetensors file ({exc})") from None
    if metadata.get("saferedir.format") != FORMAT_NAME:
        raise BundleFormatError(
            path,
            f"not a saferedir redirector bundle (metadata 'saferedir.format' is "
            f"{metadata.get('saferedir.format')!r}, expected {FORMAT_NAME!r})",
        )
    return metadata


def read_bundle_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a bundle file, after checking that it is a saferedir bundle of
    this SDK's format version."""
    path = Path(path)
    metadata = _read_metadata(path)
    version = metadata.get("saferedir.version")
    if version == "1":
        raise BundleFormatError(
            path,
            f"bundle format version 1 (saferedir-sdk 0.1); this SDK reads version "
            f"{FORMAT_VERSION}. Convert it exactly (same weights, same outputs) with: "
            f"saferedir bundle upgrade {path} NEW.safetensors",
        )
    if version != str(FORMAT_VERSION):
        raise BundleFormatError(
            path, f"unsupported bundle format version {version!r} (this SDK reads {FORMAT_VERSION})"
        )
    return metadata


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleFormatError(path, f"tensor data unreadable or truncated ({exc})") from None
    return tensors


def load_bundle(
    path: str | Path,
    *,
    sha256: str | None = None,
    expected_backbone: BackboneFingerprint | None = None,
    device: str | torch.device = "cpu",
) -> RedirectorBundle:
    """Load and check a bundle.

    Args:
        path: the ``.safetensors`` file.
        sha256: if given, the file must have exactly this hash (the policy's pin).
        expected_backbone: if given, the bundle must have been trained for this backbone.
        device: where to put the redirector.

    Raises:
        BundleNotFoundError, BundleFormatError, BundleIntegrityError, BackboneMismatchError.
    """
    path = Path(path)
    metadata = read_bundle_metadata(path)
    digest = file_sha256(path)
    if sha256 is not None and digest != sha256.lower():
        raise BundleIntegrityError(path, sha256.lower(), digest)

    try:
        config = RedirectorConfig.from_dict(_json_field(path, metadata, "saferedir.config"))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise BundleFormatError(path, f"bad architecture config: {str(exc)[:300]}") from None
    try:
        concept = ConceptInfo(**_json_field(path, metadata, "saferedir.concept"))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise BundleFormatError(path, f"bad concept metadata: {str(exc)[:300]}") from None
    try:
        backbone = BackboneFingerprint.from_dict(_json_field(path, metadata, "saferedir.backbone"))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise BundleFormatError(path, f"bad backbone metadata: {str(exc)[:300]}") from None
    problem = _check_fits(config, backbone)
    if problem is not None:
        raise BundleFormatError(path, problem)
    training = _json_field(path, metadata, "saferedir.training")

    with torch.random.fork_rng(devices=[]):  # building the module must not move anyone's RNG
        redirector = Redirector(config)
    expected = redirector.state_dict()
    tensors = _read_tensors(path)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BundleFormatError(
            path, f"tensors do not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise BundleFormatError(
                path, f"tensor '{key}': expected shape {tuple(ref.shape)}, got {tuple(tensors[key].shape)}"
            )
        if tensors[key].dtype != torch.float32:
            raise BundleFormatError(path, f"tensor '{key}': expected dtype float32, got {tensors[key].dtype}")
        if not torch.isfinite(tensors[key]).all():
            raise BundleFormatError(path, f"tensor '{key}' holds NaN or infinite values")
        largest = float(tensors[key].abs().max()) if tensors[key].numel() else 0.0
        if largest > MAX_ABS_WEIGHT:
            raise BundleFormatError(
                path,
                f"tensor '{key}': a value of magnitude {largest:.3g} (trained weights stay below {MAX_ABS_WEIGHT:g})",
            )
    if all(not bool(t.any()) for t in tensors.values()):
        raise BundleFormatError(path, "every tensor is zero: not a trained redirector")
    redirector.load_state_dict(tensors, strict=True)
    redirector.to(device).eval().requires_grad_(False)

    bundle = RedirectorBundle(redirector, concept, backbone, training, path=path.resolve(), sha256=digest)
    if expected_backbone is not None:
        bundle.check_backbone(expected_backbone)
    return bundle


# --- ensembles of classifiers -----------------------------------------------------------------


def ensemble_bundle(base: str | Path, members: Sequence[str | Path], out: str | Path) -> str:
    """Join the classifiers of ``members`` to ``base``'s and write the result to ``out``; returns
    its sha256.

    The bundle written redirects exactly as ``base`` (its every other weight is base's) and decides
    by the mean of its K = 1 + len(members) classifiers' p(unsafe) (``classifier_members`` K): fits
    of one classifier on other seeds or recipes (``saferedir train --trainable classifier``) whose
    errors differ. Every file must be a bundle of one concept and backbone with the same
    architecture and a classifier with an encoder of its own (``classifier_encoder`` "own", one
    member each), and no two may hold the same classifier. The training history is base's, and
    ``ensemble.members`` keeps each member's sha256 and training record (:func:`classified_below`
    reads the lowest level any of them was trained at)."""
    if not members:
        raise ValueError("ensemble_bundle: expected at least one member bundle besides the base")
    first = load_bundle(base)
    cap = first.config.capacity
    if cap.classifier_encoder != "own" or cap.classifier_members != 1:
        raise BundleFormatError(
            first.path or base,
            "an ensemble's base needs one classifier with a latent encoder of its own (classifier_encoder "
            f"'own', classifier_members 1), got {cap.classifier_encoder!r} with {cap.classifier_members}",
        )
    names = first.redirector.classifier_modules()

    def classifier_of(bundle: RedirectorBundle) -> dict[str, torch.Tensor]:
        return {k: v for k, v in bundle.redirector.state_dict().items() if k.split(".")[0] in names}

    seen = [classifier_of(first)]
    state = first.redirector.state_dict()
    records = []
    for j, path in enumerate(members, 1):
        other = load_bundle(path)
        where = other.path or path
        if other.config != first.config:
            raise BundleFormatError(
                where,
                f"its architecture differs from the base's ({first.path}): {other.config} vs {first.config}",
            )
        mine, theirs = (
            (first.concept.name, first.concept.category),
            (other.concept.name, other.concept.category),
        )
        if mine != theirs:
            raise BundleFormatError(
                where,
                f"trained for concept {theirs[0]!r} ({theirs[1]}), the base ({first.path}) for {mine[0]!r} ({mine[1]})",
            )
        other.check_backbone(first.backbone)
        classifier = classifier_of(other)
        if any(all(torch.equal(classifier[k], s[k]) for k in classifier) for s in seen):
            raise BundleFormatError(
                where,
                "its classifier is one the ensemble already holds (the same fit twice weighs it double)",
            )
        seen.append(classifier)
        state.update({f"member{j}_{k}": v for k, v in classifier.items()})
        records.append({"sha256": other.sha256, "training": other.training})
    config = replace(first.config, capacity=replace(cap, classifier_members=1 + len(records)))
    with torch.random.fork_rng(devices=[]):
        redirector = Redirector(config)
    redirector.load_state_dict(state, strict=True)
    training = {
        **first.training,
        "ensemble": {
            "combine": "mean of the members' p(unsafe)",
            "base": {"sha256": first.sha256},
            "members": records,
        },
    }
    return save_bundle(out, redirector, first.concept, first.backbone, training)


# --- format 1 -> 2 --------------------------------------------------------------------------

# v1 had one token stream: its per-stream tensors become stream 0's
_V1_RENAMES = {"token_norm.": "token_norms.0.", "token_proj.": "token_projs.0.", "delta_up.": "delta_ups.0."}
_V1_STREAM = "text_encoder"  # the component the SD adapter names the one stream of SD-style backbones


def upgrade_bundle(old: str | Path, new: str | Path) -> str:
    """Convert a format-1 bundle to format 2 exactly (the same weights under the new names, the
    same outputs for the same inputs) and write it to ``new``; returns its sha256.

    Version 1 embedded raw scheduler timesteps 0..``num_train_timesteps``; version 2 embeds the
    normalised timestep times ``time_embed_scale``, which is set to that ``num_train_timesteps``.
    """
    old = Path(old)
    metadata = _read_metadata(old)
    if metadata.get("saferedir.version") != "1":
        raise BundleFormatError(old, f"not a format-1 bundle (version {metadata.get('saferedir.version')!r})")
    cfg = _json_field(old, metadata, "saferedir.config")
    bb = _json_field(old, metadata, "saferedir.backbone")
    try:
        stream = {"name": _V1_STREAM, "seq_len": cfg["seq_len"], "dim": cfg["token_dim"]}
        config = {
            "streams": [stream],
            "latent_channels": cfg["latent_channels"],
            "pooled_dim": 0,
            "capacity": {k: cfg[k] for k in ("hidden_dim", "rank", "num_heads", "latent_pool")}
            | {"token_layers": cfg.get("token_layers", 0), "latent_layers": 2, "latent_readout": "mean"},
            "time_embed_scale": float(cfg.get("num_train_timesteps", 1000)),
        }
        backbone = {
            "streams": [stream],
            "pooled_dim": 0,
            "latent_channels": bb["latent_channels"],
            "encoders": [
                {
                    "name": _V1_STREAM,
                    "tokenizer_sha256": bb["tokenizer_sha256"],
                    "weights_sha256": bb["text_encoder_sha256"],
                }
            ],
            "family": bb.get("family", ""),
        }
        RedirectorConfig.from_dict(config)
        BackboneFingerprint.from_dict(backbone)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleFormatError(old, f"format-1 metadata incomplete or invalid: {exc!r}") from None
    tensors = {}
    for key, value in _read_tensors(old).items():
        if key == "position":
            key = "positions.0"
        for prefix, replacement in _V1_RENAMES.items():
            if key.startswith(prefix):
                key = replacement + key[len(prefix) :]
        tensors[key] = value.to(torch.float32).contiguous()
    upgraded = {
        **metadata,
        "saferedir.version": str(FORMAT_VERSION),
        "saferedir.config": json.dumps(config, sort_keys=True),
        "saferedir.backbone": json.dumps(backbone, sort_keys=True),
        "saferedir.upgraded_from": json.dumps({"version": 1, "sha256": file_sha256(old)}),
    }
    sha = _write(Path(new), tensors, upgraded)
    try:
        load_bundle(new)  # what was written loads and matches its architecture
    except BaseException:
        Path(new).unlink(missing_ok=True)
        raise
    return sha
