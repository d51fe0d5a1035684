"""Redirector bundle files: one ``.safetensors`` file per trained redirector.

The tensors are the redirector's state dict; the safetensors metadata (string -> string) holds:

=========================  =======================================================================
``saferedir.format``        ``"saferedir-redirector"``
``saferedir.version``       format version (``"1"``)
``saferedir.config``        JSON of :class:`RedirectorConfig` (the architecture)
``saferedir.concept``       JSON ``{"name", "category", "description"}``
``saferedir.backbone``      JSON of the :class:`BackboneFingerprint` it was trained for
``saferedir.training``      JSON training summary (data sizes, accuracies, time, versions)
=========================  =======================================================================

Loading checks all of it and raises a typed :class:`~saferedir_sdk.errors.BundleError` subclass
naming the file and the mismatch. Never pickle: only safetensors is read or written. The
``sha256`` of the file is what policies pin.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import BackboneMismatchError, BundleFormatError, BundleIntegrityError, BundleNotFoundError
from .fingerprint import BackboneFingerprint
from .redirector import Redirector, RedirectorConfig

FORMAT_NAME = "saferedir-redirector"
FORMAT_VERSION = 1
_CATEGORIES = ("nsfw", "artist_style", "object", "custom")


@dataclass(frozen=True)
class ConceptInfo:
    """The concept a redirector erases."""

    name: str
    category: str
    description: str = ""

    def __post_init__(self) -> None:
        if self.category not in _CATEGORIES:
            raise ValueError(f"concept category must be one of {_CATEGORIES}, got {self.category!r}")


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


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_bundle(
    path: str | Path,
    redirector: Redirector,
    concept: ConceptInfo,
    backbone: BackboneFingerprint,
    training: dict[str, Any] | None = None,
) -> str:
    """Write a bundle atomically (temporary file, then rename) and return its sha256."""
    path = Path(path)
    if redirector.config.token_dim != backbone.token_dim or redirector.config.seq_len != backbone.seq_len:
        raise ValueError(
            f"redirector config (T={redirector.config.seq_len}, D={redirector.config.token_dim}) does not match "
            f"the backbone fingerprint (T={backbone.seq_len}, D={backbone.token_dim})"
        )
    metadata = {
        "saferedir.format": FORMAT_NAME,
        "saferedir.version": str(FORMAT_VERSION),
        "saferedir.config": json.dumps(redirector.config.to_dict(), sort_keys=True),
        "saferedir.concept": json.dumps({"name": concept.name, "category": concept.category, "description": concept.description}),
        "saferedir.backbone": json.dumps(backbone.to_dict(), sort_keys=True),
        "saferedir.training": json.dumps(training or {}, sort_keys=True, default=str),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in redirector.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return file_sha256(path)


def _json_field(path: Path, metadata: dict[str, str], key: str) -> Any:
    if key not in metadata:
        raise BundleFormatError(path, f"metadata key '{key}' is missing")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise BundleFormatError(path, f"metadata key '{key}' is not valid JSON: {exc}") from None


def read_bundle_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of a bundle file, after checking that it is a saferedir bundle."""
    path = Path(path)
    if not path.is_file():
        raise BundleNotFoundError(path, "no such bundle file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleFormatError(path, f"not a readable safetensors file ({exc})") from None
    if metadata.get("saferedir.format") != FORMAT_NAME:
        raise BundleFormatError(path, f"not a saferedir redirector bundle (metadata 'saferedir.format' is "
                                      f"{metadata.get('saferedir.format')!r}, expected {FORMAT_NAME!r})")
    version = metadata.get("saferedir.version")
    if version != str(FORMAT_VERSION):
        raise BundleFormatError(path, f"unsupported bundle format version {version!r} (this SDK reads {FORMAT_VERSION})")
    return metadata


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
    except (TypeError, ValueError) as exc:
        raise BundleFormatError(path, f"bad architecture config: {exc}") from None
    try:
        concept = ConceptInfo(**_json_field(path, metadata, "saferedir.concept"))
        backbone = BackboneFingerprint.from_dict(_json_field(path, metadata, "saferedir.backbone"))
    except (TypeError, ValueError) as exc:
        raise BundleFormatError(path, f"bad concept or backbone metadata: {exc}") from None
    if (backbone.token_dim, backbone.seq_len, backbone.latent_channels) != (
        config.token_dim, config.seq_len, config.latent_channels
    ):
        raise BundleFormatError(path, "architecture config and backbone fingerprint disagree on dimensions")
    training = _json_field(path, metadata, "saferedir.training")

    redirector = Redirector(config)
    expected = redirector.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleFormatError(path, f"tensor data unreadable or truncated ({exc})") from None
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BundleFormatError(path, f"tensors do not match the architecture: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, ref in expected.items():
        if tuple(tensors[key].shape) != tuple(ref.shape):
            raise BundleFormatError(path, f"tensor '{key}': expected shape {tuple(ref.shape)}, got {tuple(tensors[key].shape)}")
        if not torch.isfinite(tensors[key]).all():
            raise BundleFormatError(path, f"tensor '{key}' holds NaN or infinite values")
    redirector.load_state_dict(tensors, strict=True)
    redirector.to(device).eval().requires_grad_(False)

    bundle = RedirectorBundle(redirector, concept, backbone, training, path=path.resolve(), sha256=digest)
    if expected_backbone is not None:
        bundle.check_backbone(expected_backbone)
    return bundle
