"""The text conditioning of a batch, as the redirector reads and writes it.

A backbone conditions its denoiser on one or more *token streams* (per-token states: SD 1.x/2.x
one, SDXL two text encoders side by side, SD3 CLIP and T5 one after the other, FLUX T5) and
optionally a *pooled* embedding (SDXL's ``text_embeds``, SD3/FLUX's ``pooled_projections``). An
adapter cuts a denoiser call's arguments into a :class:`Conditioning` per half of a CFG batch and
puts a (possibly redirected) one back; the engine and the redirector work on it and on nothing
backbone-specific.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenStream:
    """Shape of one token stream of one prompt: ``seq_len`` tokens of ``dim`` features.

    ``name`` says where it comes from (``"text_encoder"``, ``"text_encoder_2"``, ``"t5"``);
    it is recorded in bundles and compared with the pipeline's.
    """

    name: str
    seq_len: int
    dim: int

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"TokenStream.name: expected a non-empty string, got {self.name!r}")
        for field in ("seq_len", "dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TokenStream.{field}: expected an int >= 1, got {value!r}")


@dataclass(frozen=True)
class Conditioning:
    """The text conditioning of B samples.

    Attributes:
        tokens: one (B, T_s, D_s) tensor per token stream, in the backbone fingerprint's order.
        pooled: (B, P) pooled embedding, or None for backbones without one.
    """

    tokens: tuple[torch.Tensor, ...]
    pooled: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.tokens[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens[0].device

    def parts(self) -> tuple[torch.Tensor, ...]:
        """Every tensor: the token streams, then the pooled embedding if there is one."""
        return (*self.tokens, *(() if self.pooled is None else (self.pooled,)))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        """``fn`` applied to every tensor (tokens and pooled)."""
        return Conditioning(
            tuple(fn(t) for t in self.tokens), None if self.pooled is None else fn(self.pooled)
        )

    def zip_with(
        self, other: Conditioning, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ) -> Conditioning:
        """``fn(mine, theirs)`` tensor by tensor (both must have the same streams and pooled part)."""
        pooled = None if self.pooled is None or other.pooled is None else fn(self.pooled, other.pooled)
        return Conditioning(tuple(fn(a, b) for a, b in zip(self.tokens, other.tokens)), pooled)

    def rows(self, index: slice | torch.Tensor) -> Conditioning:
        """The samples ``index`` of the batch."""
        return self.map(lambda t: t[index])

    def where(self, on: torch.Tensor, other: Conditioning) -> Conditioning:
        """Per sample: ``self`` where ``on`` (B,) is true, else ``other`` (no host read)."""

        def pick(mine: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
            return torch.where(on.view(-1, *([1] * (mine.ndim - 1))), mine, theirs)

        return self.zip_with(other, pick)

    def masked(self, on: torch.Tensor) -> Conditioning:
        """Per sample: ``self`` where ``on`` (B,) is true, else zeros (no host read)."""
        return self.map(lambda t: torch.where(on.view(-1, *([1] * (t.ndim - 1))), t, 0.0))

    def check(self, streams: tuple[TokenStream, ...], pooled_dim: int, what: str) -> None:
        """Raise :class:`~saferedir_sdk.errors.TensorShapeError` naming ``what`` if the tensors do not
        have the streams' (T, D), or ``pooled_dim`` > 0 and the pooled part is missing or not that
        wide (``pooled_dim`` 0: a pooled part, if any, is not read)."""
        from .errors import TensorShapeError

        if len(self.tokens) != len(streams):
            raise TensorShapeError(f"{what} token streams", f"{len(streams)} stream(s)", (len(self.tokens),))
        b = self.batch_size
        for stream, tensor in zip(streams, self.tokens):
            if tensor.ndim != 3 or tuple(tensor.shape) != (b, stream.seq_len, stream.dim):
                raise TensorShapeError(
                    f"{what} '{stream.name}'", f"({b}, {stream.seq_len}, {stream.dim})", tuple(tensor.shape)
                )
        if pooled_dim and (self.pooled is None or tuple(self.pooled.shape) != (b, pooled_dim)):
            got = () if self.pooled is None else tuple(self.pooled.shape)
            raise TensorShapeError(f"{what} pooled embedding", f"({b}, {pooled_dim})", got)
