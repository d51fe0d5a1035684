"""Backbone fingerprints: what a redirector bundle was trained for, and what a pipeline has.

Adapters compute a pipeline's fingerprint with the helpers here; bundles store one in their
metadata; the guard compares the two before it enforces anything.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

# Fields compared between a bundle and a pipeline, in the order they are checked.
CHECKED_FIELDS = ("token_dim", "seq_len", "latent_channels", "tokenizer_sha256", "text_encoder_sha256")


@dataclass(frozen=True)
class BackboneFingerprint:
    """What identifies a backbone for a redirector.

    ``token_dim`` and ``seq_len``: the shape of one prompt's conditional embeddings (T, D);
    ``latent_channels``: channels of the denoiser's sample; ``tokenizer_sha256``: hash of the
    tokenizer vocabulary; ``text_encoder_sha256``: hash of the text encoder's weights
    (:func:`module_sha256`). ``family`` names the adapter family (informational, not compared).
    """

    token_dim: int
    seq_len: int
    latent_channels: int
    tokenizer_sha256: str
    text_encoder_sha256: str
    family: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneFingerprint:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def first_difference(self, other: BackboneFingerprint) -> tuple[str, Any, Any] | None:
        """(field, self's value, other's value) for the first checked field that differs, else None."""
        for name in CHECKED_FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return name, mine, theirs
        return None


def vocab_sha256(vocab: Mapping[str, int]) -> str:
    """sha256 of a tokenizer vocabulary (token -> id), independent of dict order."""
    payload = json.dumps(sorted(vocab.items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


_SAMPLES_PER_TENSOR = 65536


@torch.no_grad()
def module_sha256(module: nn.Module) -> str:
    """A dtype- and device-independent hash of a module's weights.

    Each parameter and buffer contributes its name, shape and up to 65,536 evenly strided
    values rounded to float16 (so fp32 and fp16 copies of the same weights agree, and a 1B
    parameter encoder hashes in well under a second). Any fine-tune, merge or swap of the
    weights changes it.
    """
    digest = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(dict(module.named_buffers()))
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(name.encode())
        digest.update(repr(tuple(tensor.shape)).encode())
        flat = tensor.reshape(-1)
        if not torch.is_floating_point(flat):
            flat = flat.to(torch.float64)
        stride = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::stride][:_SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.float16).contiguous()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
