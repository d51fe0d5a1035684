"""Backbone fingerprints: what a redirector bundle was trained for, and what a pipeline has.

Adapters compute a pipeline's fingerprint with the helpers here; bundles store one in their
metadata; the guard compares the two before it enforces anything. A fingerprint is independent
of dtype and device (an fp16 copy on a GPU has the fp32 CPU copy's fingerprint).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .conditioning import TokenStream


@dataclass(frozen=True)
class TextEncoderPrint:
    """One text encoder of a backbone: its component name, tokenizer vocabulary hash
    (:func:`vocab_sha256`) and weights hash (:func:`module_sha256`)."""

    name: str
    tokenizer_sha256: str
    weights_sha256: str


@dataclass(frozen=True)
class BackboneFingerprint:
    """What identifies a backbone for a redirector.

    Attributes:
        streams: the token streams the denoiser is conditioned on (name, tokens, dim), in the
            order the adapter's :class:`~saferedir_sdk.conditioning.Conditioning` holds them.
        pooled_dim: width of the pooled text embedding (0: the backbone has none).
        latent_channels: channels of the adapter's latent view (B, C, H, W) the redirector reads.
        encoders: one entry per text encoder, in the pipeline's order.
        family: the adapter family (``"sd1"``, ``"sdxl"``, ...); informational, not compared.
    """

    streams: tuple[TokenStream, ...]
    pooled_dim: int
    latent_channels: int
    encoders: tuple[TextEncoderPrint, ...]
    family: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "streams": [{"name": s.name, "seq_len": s.seq_len, "dim": s.dim} for s in self.streams],
            "pooled_dim": self.pooled_dim,
            "latent_channels": self.latent_channels,
            "encoders": [
                {"name": e.name, "tokenizer_sha256": e.tokenizer_sha256, "weights_sha256": e.weights_sha256}
                for e in self.encoders
            ],
            "family": self.family,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneFingerprint:
        """Inverse of :meth:`to_dict`. Raises ``ValueError``/``TypeError`` naming the bad entry."""
        if not isinstance(data, Mapping):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        unknown = set(data) - {"streams", "pooled_dim", "latent_channels", "encoders", "family"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)}")
        streams = tuple(TokenStream(**_obj(s, f"streams.{i}")) for i, s in enumerate(_list(data, "streams")))
        encoders = tuple(
            TextEncoderPrint(**_obj(e, f"encoders.{i}")) for i, e in enumerate(_list(data, "encoders"))
        )
        for i, e in enumerate(encoders):
            for key in ("name", "tokenizer_sha256", "weights_sha256"):
                if not isinstance(getattr(e, key), str):
                    raise TypeError(f"encoders.{i}.{key}: expected a string, got {getattr(e, key)!r}")
        pooled, channels = data.get("pooled_dim"), data.get("latent_channels")
        for key, value, least in (("pooled_dim", pooled, 0), ("latent_channels", channels, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{key}: expected an int >= {least}, got {value!r}")
        family = data.get("family", "")
        if not isinstance(family, str):
            raise TypeError(f"family: expected a string, got {family!r}")
        if not streams:
            raise ValueError("streams: expected at least one token stream")
        return cls(streams, pooled, channels, encoders, family)

    def first_difference(self, other: BackboneFingerprint) -> tuple[str, Any, Any] | None:
        """(field, self's value, other's value) for the first compared field that differs, else None.

        Compared in this order: token streams (shape), pooled width, latent channels, the number of
        text encoders, then each encoder's name, tokenizer and weights.
        """
        mine = self.to_dict()
        theirs = other.to_dict()
        for key in ("streams", "pooled_dim", "latent_channels"):
            if mine[key] != theirs[key]:
                return key, mine[key], theirs[key]
        if len(self.encoders) != len(other.encoders):
            return "encoders", [e.name for e in self.encoders], [e.name for e in other.encoders]
        for a, b in zip(self.encoders, other.encoders):
            for key in ("name", "tokenizer_sha256", "weights_sha256"):
                if getattr(a, key) != getattr(b, key):
                    return f"encoders[{a.name}].{key}", getattr(a, key), getattr(b, key)
        return None

    def weight_differences(self, other: BackboneFingerprint) -> list[tuple[str, str, str]] | None:
        """Where ``other`` is this backbone with other text-encoder *weights* only (an
        AdvUnlearn-style edited encoder: same streams, pooled width, latent channels, encoders and
        tokenizers): (encoder, self's weights hash, other's) per changed encoder. None when anything
        else differs, or nothing does."""
        first = self.first_difference(other)
        if first is None or not first[0].endswith(".weights_sha256"):
            return None
        changed = []
        for a, b in zip(self.encoders, other.encoders):
            if a.name != b.name or a.tokenizer_sha256 != b.tokenizer_sha256:
                return None
            if a.weights_sha256 != b.weights_sha256:
                changed.append((a.name, a.weights_sha256, b.weights_sha256))
        return changed


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data.get(key)
    if not isinstance(value, list):
        raise TypeError(f"{key}: expected a list, got {value!r}")
    return value


def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{where}: expected an object, got {value!r}")
    return value


def vocab_sha256(vocab: Mapping[str, int]) -> str:
    """sha256 of a tokenizer vocabulary (token -> id), independent of dict order."""
    payload = json.dumps(sorted(vocab.items()), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


_SAMPLES_PER_TENSOR = 65536


@torch.no_grad()
def unwrap_compiled(module: Any) -> Any:
    """The module a ``torch.compile(module)`` wrapper (``OptimizedModule``) compiles, else ``module``
    itself: what adapters recognise and what weights are hashed (a compiled denoiser is the same
    model)."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


_PROBES_PER_TENSOR = 4


@dataclass(frozen=True)
class WeightsProbe:
    """A few values of every parameter and buffer of a module, read at one moment: a cheap way to
    tell whether its weights were edited since (:meth:`changed_since`), read per guarded call.

    Each tensor contributes its name, shape and up to 4 evenly strided values (float32, on the
    CPU; one device-to-host copy per device and dtype). Moving the module to another device or
    dtype changes nothing (values are compared within both dtypes' rounding, float8 storage
    included); adding, removing or reshaping a tensor (a LoRA's layers injected, a textual
    inversion's rows appended) or writing new values into one (a LoRA fused, ``load_state_dict``,
    ``weight.data += ...``) does, unless the write leaves all 4 probed values of every tensor
    within rounding -- :func:`module_sha256` reads 65,536 values per tensor where a probe reads 4.
    """

    layout: tuple[tuple[str, tuple[int, ...]], ...]
    values: torch.Tensor  # (N,) float32, CPU, in the tensors' name order
    eps: torch.Tensor  # (N,) the relative step of the dtype each value was read in
    subnormal: torch.Tensor  # (N,) that dtype's step below its smallest normal number

    @classmethod
    @torch.no_grad()
    def read(cls, module: nn.Module) -> WeightsProbe:
        module = unwrap_compiled(module)
        tensors = dict(module.named_parameters())
        tensors.update(dict(module.named_buffers()))
        layout: list[tuple[str, tuple[int, ...]]] = []
        # views (no copy yet) per device and dtype, with where their values go in name order
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[int]]] = {}
        count = 0
        for name in sorted(tensors):
            tensor = tensors[name]
            layout.append((name, tuple(tensor.shape)))
            n = tensor.numel()
            if tensor.is_meta or n == 0:  # offloaded to the meta device: its layout only
                continue
            stride = max(1, n // _PROBES_PER_TENSOR)
            sample = tensor.reshape(-1)[: stride * _PROBES_PER_TENSOR : stride]  # a view (no_grad)
            views, at = groups.setdefault((tensor.device, tensor.dtype), ([], []))
            views.append(sample)
            at.extend(range(count, count + sample.numel()))
            count += sample.numel()
        values, eps, subnormal = torch.zeros(count), torch.zeros(count), torch.zeros(count)
        for (_, dtype), (views, at) in groups.items():
            index = torch.tensor(at, dtype=torch.long)
            values[index] = torch.cat(views).to(torch.float32).cpu()  # one copy per device and dtype
            info = torch.finfo(dtype if dtype.is_floating_point else torch.float32)
            eps[index] = max(info.eps, torch.finfo(torch.float32).eps) if dtype.is_floating_point else 0.0
            subnormal[index] = info.smallest_normal * info.eps if dtype.is_floating_point else 0.0
        return cls(tuple(layout), values, eps, subnormal)

    def changed_since(self, earlier: WeightsProbe) -> str | None:
        """What differs from ``earlier`` (a tensor added, removed or reshaped; a value moved by more
        than the rounding of the dtypes either was read in), or None."""
        if self.layout != earlier.layout:
            now, then = dict(self.layout), dict(earlier.layout)
            added = sorted(set(now) - set(then))
            removed = sorted(set(then) - set(now))
            reshaped = sorted(n for n in set(now) & set(then) if now[n] != then[n])
            parts = [
                f"{what} {names[0]!r}" + (f" and {len(names) - 1} more" if len(names) > 1 else "")
                for what, names in (("added", added), ("removed", removed), ("reshaped", reshaped))
                if names
            ]
            return "tensors " + "; ".join(parts)  # names are sorted: a layout differs in one of these
        if self.values.shape != earlier.values.shape:
            return "tensors moved to or from the meta device"
        tolerance = 2 * (
            torch.maximum(self.eps, earlier.eps) * earlier.values.abs()
            + torch.maximum(self.subnormal, earlier.subnormal)
        )
        same = ((self.values - earlier.values).abs() <= tolerance) | (
            self.values.isnan() & earlier.values.isnan()
        )
        moved = int((~same).sum())
        return f"{moved} of {same.numel()} probed values changed" if moved else None


def module_sha256(module: nn.Module) -> str:
    """A dtype- and device-independent hash of a module's weights.

    Each parameter and buffer contributes its name, shape and up to 65,536 evenly strided
    values rounded to float16 (so fp32 and fp16 copies of the same weights agree, and a 1B
    parameter encoder hashes in well under a second). Any fine-tune, merge or swap of the
    weights changes it.
    """
    digest = hashlib.sha256()
    module = unwrap_compiled(module)
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
