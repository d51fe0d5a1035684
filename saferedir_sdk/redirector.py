"""The SafeRedir redirector: one small network per concept and backbone.

Per denoising step it reads the current latent ``z_t`` (the adapter's (B, C, H, W) view), the
timestep ``t`` on the normalised scale (0 clean .. 1 pure noise, whatever the scheduler) and the
conditional text conditioning ``E`` (one or more token streams, optionally a pooled embedding)
and predicts, in four parts:

* a latent-aware multimodal **classifier**: p(unsafe) from latent features (a small convolutional
  encoder read out by its mean, or mean and maximum: what the image is becoming), the timestep and the
  prompt (its tokens pooled, and cross-attended by the latent/time query; the pooled embedding
  when the backbone has one and the config reads it); or, with ``capacity.classifier_reads``
  "latent", from the latent features and the timestep alone, so no wording moves the decision (with
  ``classifier_encoder`` "own", through a latent encoder of its own; with ``classifier_members`` K,
  K such classifiers whose probabilities are averaged);
* a token-level **delta generator**: a per-token direction ``D`` per stream: a low-rank head, plus
  (with ``token_layers`` > 0) a copy head that points a token at an attention-weighted mix of its
  stream's other token embeddings. Both read token features mixed by self-attention over all the
  prompt's tokens, because a contextual text encoder moves every token when one word changes, by
  an amount that depends on that word; and, with ``pooled_dim`` > 0, a direction for the pooled
  embedding;
* a token **mask predictor**: ``m`` in [0, 1] per token (and one gate for the pooled embedding);
* an adaptive **scale predictor**: ``alpha`` in [0, 1], how far to move.

Redirected embeddings: ``E' = E + s * alpha * m * normalize(D) * |E|`` per token (and for the
pooled embedding with its gate as ``m``), with ``s`` the policy's strength (:func:`redirection`).
Every size comes from :class:`RedirectorConfig`, which is built from the backbone fingerprint;
nothing is fixed to 768/77/4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .capacity import Capacity
from .conditioning import Conditioning, TokenStream
from .errors import TensorShapeError
from .fingerprint import BackboneFingerprint


@dataclass(frozen=True)
class RedirectorConfig:
    """Architecture of a redirector: the backbone's shapes plus the capacity.

    Attributes:
        streams: the token streams it reads and moves (from the backbone fingerprint).
        latent_channels: channels of the latent view.
        pooled_dim: width of the pooled embedding it reads and moves; 0: it ignores a pooled part.
        capacity: :class:`Capacity`.
        time_embed_scale: the normalised timestep is multiplied by this before the sinusoidal
            embedding (1000: the frequencies of a DDPM-style 0..999 timestep embedding).
    """

    streams: tuple[TokenStream, ...]
    latent_channels: int
    pooled_dim: int = 0
    capacity: Capacity = field(default_factory=Capacity)
    time_embed_scale: float = 1000.0

    def __post_init__(self) -> None:
        if not self.streams or not all(isinstance(s, TokenStream) for s in self.streams):
            raise ValueError(
                f"RedirectorConfig.streams: expected one or more TokenStream, got {self.streams!r}"
            )
        for name, least in (("latent_channels", 1), ("pooled_dim", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"RedirectorConfig.{name}: expected an int >= {least}, got {value!r}")
        if not isinstance(self.time_embed_scale, int | float) or not self.time_embed_scale > 0:
            raise ValueError(
                f"RedirectorConfig.time_embed_scale: expected a number > 0, got {self.time_embed_scale!r}"
            )

    @classmethod
    def for_backbone(
        cls, backbone: BackboneFingerprint, capacity: Capacity | None = None, *, pooled: bool = True
    ) -> RedirectorConfig:
        """A config sized from ``backbone``; ``pooled=False`` leaves its pooled embedding alone."""
        return cls(
            backbone.streams,
            backbone.latent_channels,
            backbone.pooled_dim if pooled else 0,
            capacity or Capacity(),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RedirectorConfig:
        """Inverse of :meth:`to_dict`; ``ValueError``/``TypeError`` naming what is wrong."""
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown RedirectorConfig keys: {sorted(unknown)}")
        streams = data.get("streams")
        capacity = data.get("capacity", {})
        if not isinstance(streams, list) or not all(isinstance(s, dict) for s in streams):
            raise TypeError(f"streams: expected a list of objects, got {streams!r}")
        if not isinstance(capacity, dict):
            raise TypeError(f"capacity: expected an object, got {capacity!r}")
        unknown = set(capacity) - {f.name for f in fields(Capacity)}
        if unknown:
            raise ValueError(f"unknown capacity keys: {sorted(unknown)}")
        return cls(
            streams=tuple(TokenStream(**s) for s in streams),
            latent_channels=data.get("latent_channels"),  # type: ignore[arg-type]
            pooled_dim=data.get("pooled_dim", 0),
            capacity=Capacity(**capacity),
            time_embed_scale=data.get("time_embed_scale", 1000.0),
        )


class RedirectorOutput(NamedTuple):
    """What a redirector predicts for a batch of B samples.

    ``directions`` and ``masks`` hold one entry per token stream: (B, T_s, D_s) raw deltas ``D``
    (normalised per token when applied) and (B, T_s) token weights in [0, 1]. ``pooled_direction``
    (B, P) and ``pooled_mask`` (B,) exist when the config reads a pooled embedding.
    """

    logit: torch.Tensor  # (B,) unsafe logit; p(unsafe) = sigmoid(logit)
    directions: tuple[torch.Tensor, ...]
    masks: tuple[torch.Tensor, ...]
    alpha: torch.Tensor  # (B,) in [0, 1]
    pooled_direction: torch.Tensor | None = None
    pooled_mask: torch.Tensor | None = None


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of timesteps ``t`` (B,) -> (B, dim), as in DDPM/diffusers."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def apply_redirection(
    embeds: torch.Tensor,
    direction: torch.Tensor,
    mask: torch.Tensor,
    alpha: torch.Tensor,
    strength: float | torch.Tensor,
) -> torch.Tensor:
    """The redirection delta ``s * alpha * m * normalize(D) * |E|`` for every vector of ``embeds``.

    Args:
        embeds: (B, T, D) token embeddings ``E`` (or (B, D) for a pooled embedding).
        direction: raw delta ``D``, shaped like ``embeds``, or (K, B, ...) for K stacked
            redirectors (:mod:`~saferedir_sdk.stacked`; ``mask``, ``alpha`` and a tensor
            ``strength`` then lead with K too).
        mask: (B, T) token weights ``m`` (or (B,) for a pooled embedding).
        alpha: (B,) scales.
        strength: the policy's ``s`` (float, or (B,) tensor).

    Returns:
        The delta to add to ``embeds`` (``direction``'s shape and dtype).
    """
    unit = F.normalize(direction, dim=-1, eps=1e-6)
    norm = embeds.to(direction.dtype).norm(dim=-1, keepdim=True)
    trailing = (1,) * (embeds.ndim - 1)
    if isinstance(strength, torch.Tensor):
        strength = strength.to(direction.dtype).reshape(*strength.shape, *trailing)
    return strength * alpha.reshape(*alpha.shape, *trailing) * mask.unsqueeze(-1) * unit * norm


def redirection(cond: Conditioning, out: RedirectorOutput, strength: float | torch.Tensor) -> Conditioning:
    """The delta of every part of ``cond`` (float32); the pooled part gets zeros when the
    redirector does not move it. With a stacked output (leading K) every delta leads with K."""
    tokens = tuple(
        apply_redirection(e, d.float(), m.float(), out.alpha.float(), strength)
        for e, d, m in zip(cond.tokens, out.directions, out.masks)
    )
    pooled = None
    if cond.pooled is not None:
        if out.pooled_direction is None or out.pooled_mask is None:
            shape = (*out.alpha.shape[:-1], *cond.pooled.shape)  # (K,) leads for stacked redirectors
            pooled = torch.zeros(shape, dtype=torch.float32, device=cond.pooled.device)
        else:
            pooled = apply_redirection(
                cond.pooled,
                out.pooled_direction.float(),
                out.pooled_mask.float(),
                out.alpha.float(),
                strength,
            )
    return Conditioning(tokens, pooled)


GATE_LEVEL = 0.5  # a gate under this shuts a move out (:func:`shut_gates`)


def shut_gates(out: RedirectorOutput) -> torch.Tensor:
    """Where the heads shut the move out, shaped like ``alpha`` ((B,), or (K, B) stacked): ``alpha``
    under :data:`GATE_LEVEL`, or a token stream whose mask is under it on every token (the heads see
    no concept token), or a pooled gate under it."""
    shut = out.alpha < GATE_LEVEL
    for m in out.masks:
        shut = shut | (m < GATE_LEVEL).all(dim=-1)
    if out.pooled_mask is not None:
        shut = shut | (out.pooled_mask < GATE_LEVEL)
    return shut


def open_gates(out: RedirectorOutput, where: torch.Tensor) -> RedirectorOutput:
    """``out`` with its gates under :data:`GATE_LEVEL` opened to 1 where ``where`` (a bool tensor
    shaped like ``alpha``): ``alpha``, every token of a stream whose mask is under the level on every
    token, and the pooled gate. Gates at or above the level are kept as predicted.

    A rule's ``gates: yield``: the gates read the prompt, and a classifier that reads the latent
    alone has already judged the sample unsafe, so a prompt whose words the heads do not know cannot
    veto the move it asked for."""

    def lift(gate: torch.Tensor, shut: torch.Tensor) -> torch.Tensor:
        lead = where.reshape(*where.shape, *(1,) * (gate.ndim - where.ndim))
        return torch.where(lead & shut, torch.ones_like(gate), gate)

    pooled = out.pooled_mask
    return out._replace(
        alpha=lift(out.alpha, out.alpha < GATE_LEVEL),
        masks=tuple(lift(m, (m < GATE_LEVEL).all(dim=-1, keepdim=True)) for m in out.masks),
        pooled_mask=None if pooled is None else lift(pooled, pooled < GATE_LEVEL),
    )


def shift_direction(
    unsafe: Conditioning, unsafe_real: torch.Tensor, safe: Conditioning, safe_real: torch.Tensor
) -> Conditioning:
    """A concept shift's direction (a rule's ``shift``): per token stream the unit vector of
    ``mean(safe) - mean(unsafe)``, each prompt read as the mean of its real tokens' states, and the
    same of the pooled embeddings where there are any: (D_s,) per stream, (P,) pooled.

    Args:
        unsafe, safe: the encoded prompts, (N, T_s, D_s) per stream (and (N, P) pooled).
        unsafe_real, safe_real: (N, sum T_s) bool, the real (not padding) tokens, streams side by
            side as an adapter's ``encode_prompts`` returns them.

    Raises:
        ValueError: a direction is not finite or has no length (the two lists read alike), naming
            the stream.
    """

    def mean_states(cond: Conditioning, real: torch.Tensor) -> list[torch.Tensor]:
        means, offset = [], 0
        for e in cond.tokens:
            m = real[:, offset : offset + e.shape[1]].to(torch.float32).unsqueeze(-1)
            offset += e.shape[1]
            means.append(((e.float() * m).sum(1) / m.sum(1).clamp(min=1.0)).mean(0))
        if cond.pooled is not None:
            means.append(cond.pooled.float().mean(0))
        return means

    directions = []
    names = [f"token stream {i}" for i in range(len(safe.tokens))] + ["pooled"] * (safe.pooled is not None)
    for name, a, b in zip(names, mean_states(unsafe, unsafe_real), mean_states(safe, safe_real)):
        d = b - a
        length = float(d.norm())
        if not math.isfinite(length) or length <= 1e-6 * max(float(a.norm()), float(b.norm()), 1e-12):
            raise ValueError(f"{name}: the safe and unsafe prompts give no direction (length {length:.3g})")
        directions.append(d / length)
    n = len(safe.tokens)
    return Conditioning(tuple(directions[:n]), directions[n] if safe.pooled is not None else None)


def shift_delta(cond: Conditioning, direction: Conditioning, scale: torch.Tensor) -> Conditioning:
    """The concept shift of every vector of ``cond`` (B samples) for K stacked rules:
    ``scale * |E| * direction``, float32, each part leading with K like :func:`redirection`'s.

    Args:
        direction: (K, D_s) unit directions per stream and (K, P) pooled (zeros for a rule
            without a shift).
        scale: (K, B), the rule's shift scale times its strength per sample.
    """

    def part(e: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        norm = e.float().norm(dim=-1, keepdim=True).unsqueeze(0)  # (1, B, ..., 1)
        s = scale.reshape(*scale.shape, *(1,) * (e.ndim - 1))  # (K, B, 1.., 1)
        d = d.reshape(d.shape[0], *(1,) * (e.ndim - 1), d.shape[-1])  # (K, 1.., D)
        return s * d * norm

    pooled = None
    if cond.pooled is not None:
        d = direction.pooled
        pooled = part(
            cond.pooled, d if d is not None else cond.pooled.new_zeros(scale.shape[0], cond.pooled.shape[-1])
        )
    return Conditioning(tuple(part(e, d) for e, d in zip(cond.tokens, direction.tokens)), pooled)


def member_prefixes(capacity: Capacity) -> tuple[str, ...]:
    """The name prefix of each classifier member's modules (``classifier_encoder`` "own"): "" for
    the first (the names a one-classifier bundle has), ``member{j}_`` for the j-th after it."""
    return ("",) + tuple(f"member{j}_" for j in range(1, capacity.classifier_members))


def mean_probability_logit(logits: torch.Tensor) -> torch.Tensor:
    """The logit of the mean of ``sigmoid(logits)`` over the first dimension (the members): an
    ensemble's p(unsafe), as a logit, in log space (no overflow at large logits). A NaN member makes
    the result NaN (never a confident "safe"); one member: its logit, unchanged."""
    if logits.shape[0] == 1:
        return logits[0]
    return torch.logsumexp(F.logsigmoid(logits), dim=0) - torch.logsumexp(F.logsigmoid(-logits), dim=0)


class Redirector(nn.Module):
    """SafeRedir redirector for one concept. See the module docstring for the four parts."""

    def __init__(self, config: RedirectorConfig):
        super().__init__()
        self.config = config
        cap = config.capacity
        h = cap.hidden_dim
        c_mid = max(32, h // 4)
        # latent encoder: pooled to latent_pool x latent_pool, two convolutions, global mean
        self.latent_pool = nn.AdaptiveAvgPool2d(cap.latent_pool)

        def latent_encoder() -> nn.Sequential:
            deeper = []
            for _ in range(cap.latent_layers - 2):  # more depth: a wider view of the shape being formed
                deeper += [nn.Conv2d(h, h, 3, stride=2, padding=1), nn.SiLU()]
            return nn.Sequential(
                nn.Conv2d(config.latent_channels, c_mid, 3, padding=1),
                nn.GroupNorm(8 if c_mid % 8 == 0 else 1, c_mid),
                nn.SiLU(),
                nn.Conv2d(c_mid, h, 3, stride=2, padding=1),
                nn.SiLU(),
                *deeper,
            )

        readout = 2 * h if cap.latent_readout == "mean+max" else h
        self.latent_encoder = latent_encoder()
        self.latent_proj = nn.Linear(readout, h)
        self.time_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))

        def own_encoder(prefix: str) -> None:
            """A classifier member's own copy of the three (same shapes), named ``{prefix}classifier_*``."""
            setattr(self, f"{prefix}classifier_latent_encoder", latent_encoder())
            setattr(self, f"{prefix}classifier_latent_proj", nn.Linear(readout, h))
            setattr(
                self,
                f"{prefix}classifier_time_mlp",
                nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h)),
            )

        if cap.classifier_encoder == "own":  # the first member's (the names a one-classifier bundle has)
            own_encoder("")
        # one input projection and position table per token stream; the streams' tokens are then
        # one sequence
        self.token_norms = nn.ModuleList(nn.LayerNorm(s.dim) for s in config.streams)
        self.token_projs = nn.ModuleList(nn.Linear(s.dim, h) for s in config.streams)
        self.positions = nn.ParameterList(nn.Parameter(torch.zeros(s.seq_len, h)) for s in config.streams)
        self.cross_attention = nn.MultiheadAttention(h, cap.num_heads, batch_first=True)
        parts = 4
        if config.pooled_dim:
            self.pooled_norm = nn.LayerNorm(config.pooled_dim)
            self.pooled_proj = nn.Linear(config.pooled_dim, h)
            parts = 5
        # classifier over [latent, time, pooled tokens, attended tokens(, pooled embedding)], or over
        # [latent, time] alone (capacity.classifier_reads "latent": the first two parts of ``fused``)
        self.classifier_parts = parts if cap.classifier_reads == "latent+prompt" else 2

        def classifier_head() -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(self.classifier_parts * h, h),
                nn.SiLU(),
                nn.Linear(h, h // 2),
                nn.SiLU(),
                nn.Linear(h // 2, 1),
            )

        self.classifier = classifier_head()
        self.context = nn.Linear(parts * h, h)
        # token-level heads, conditioned on the fused context and mixed across tokens
        self.token_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                h, cap.num_heads, 2 * h, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(cap.token_layers)
        )
        self.token_mixer = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.SiLU())
        if cap.token_layers:
            self.copy_query = nn.Linear(h, h)
            self.copy_key = nn.Linear(h, h)
            self.copy_gate = nn.Linear(h, 1)
            nn.init.constant_(self.copy_gate.bias, -2.0)
        self.delta_down = nn.Linear(h, cap.rank)
        self.delta_ups = nn.ModuleList(nn.Linear(cap.rank, s.dim) for s in config.streams)
        self.mask_head = nn.Sequential(nn.Linear(h, h // 2), nn.SiLU(), nn.Linear(h // 2, 1))
        self.scale_head = nn.Sequential(nn.Linear(h, h // 2), nn.SiLU(), nn.Linear(h // 2, 1))
        if config.pooled_dim:
            self.pooled_delta = nn.Sequential(nn.Linear(h, cap.rank), nn.Linear(cap.rank, config.pooled_dim))
            self.pooled_gate = nn.Sequential(nn.Linear(h, h // 2), nn.SiLU(), nn.Linear(h // 2, 1))
        # the other classifier members (made last: a one-member redirector is built as before)
        for prefix in member_prefixes(cap)[1:]:
            own_encoder(prefix)
            setattr(self, f"{prefix}classifier", classifier_head())

    def decision_modules(self) -> tuple[str, ...]:
        """The submodules whose weights the unsafe logit reads: the latent encoder, the timestep
        embedding and the classifier, and with ``classifier_reads`` "latent+prompt" the token
        projections, positions and cross-attention (and the pooled projection) too. Fitting every
        other module (``fit_redirector(trainable="redirection")``) leaves every decision exactly as
        it was and changes only where and how far a flagged prompt is moved."""
        if self.config.capacity.classifier_encoder == "own":
            return self.classifier_modules()
        names = ["latent_encoder", "latent_proj", "time_mlp", "classifier"]
        if self.config.capacity.classifier_reads == "latent+prompt":
            names += ["token_norms", "token_projs", "positions", "cross_attention"]
            if self.config.pooled_dim:
                names += ["pooled_norm", "pooled_proj"]
        return tuple(names)

    def classifier_modules(self) -> tuple[str, ...]:
        """The submodules only the unsafe logit reads (``fit_redirector(trainable="classifier")``
        fits these and nothing else, so every direction, mask and scale stays as it was): the
        classifier head, and with ``classifier_encoder`` "own" its latent encoder and timestep MLP
        (those of every member)."""
        if self.config.capacity.classifier_encoder == "own":
            return tuple(
                f"{prefix}{name}"
                for prefix in member_prefixes(self.config.capacity)
                for name in (
                    "classifier_latent_encoder",
                    "classifier_latent_proj",
                    "classifier_time_mlp",
                    "classifier",
                )
            )
        return ("classifier",)

    def _latent_features(self, prefix: str, pooled: torch.Tensor) -> torch.Tensor:
        """(B, h) features of the pooled latent through the ``prefix`` encoder and projection."""
        latent_map = getattr(self, f"{prefix}latent_encoder")(pooled)  # (B, h, h', w')
        z = latent_map.mean(dim=(2, 3))
        if self.config.capacity.latent_readout == "mean+max":
            z = torch.cat([z, latent_map.amax(dim=(2, 3))], dim=-1)  # (B, 2h)
        return getattr(self, f"{prefix}latent_proj")(z)

    def _member_logit(self, prefix: str, pooled: torch.Tensor, t_features: torch.Tensor) -> torch.Tensor:
        """(B,) unsafe logit of the classifier member ``prefix`` (encoder "own": latent and timestep)."""
        own = [
            self._latent_features(f"{prefix}classifier_", pooled),
            getattr(self, f"{prefix}classifier_time_mlp")(t_features),
        ]
        return getattr(self, f"{prefix}classifier")(torch.cat(own, dim=-1)).squeeze(-1)

    def check_inputs(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> None:
        """Raise :class:`TensorShapeError` naming the tensor whose shape does not fit the config."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.latent_channels:
            raise TensorShapeError("latents", f"(B, {cfg.latent_channels}, H, W)", tuple(latents.shape))
        b = latents.shape[0]
        if cond.batch_size != b:
            raise TensorShapeError(
                "conditioning", f"a batch of {b} (the latents')", tuple(cond.tokens[0].shape)
            )
        cond.check(cfg.streams, cfg.pooled_dim, "conditioning")
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, b)):
            raise TensorShapeError("timestep", f"() or ({b},)", tuple(timestep.shape))

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> RedirectorOutput:
        """
        Args:
            latents: (B, C, H, W) current latent view ``z_t`` (the conditional samples').
            timestep: () or (B,) normalised timestep(s): 0 clean .. 1 pure noise.
            cond: the conditional :class:`Conditioning` of the B samples.
        """
        self.check_inputs(latents, timestep, cond)
        cfg = self.config
        b = latents.shape[0]
        dtype = self.latent_proj.weight.dtype
        latents = latents.to(dtype)
        embeds = [e.to(dtype) for e in cond.tokens]
        t = timestep.reshape(-1).expand(b) if timestep.ndim else timestep.reshape(1).expand(b)
        h = cfg.capacity.hidden_dim

        pooled_latent = self.latent_pool(latents)
        z = self._latent_features("", pooled_latent)  # (B, h)
        t_features = timestep_embedding(t.float() * cfg.time_embed_scale, h).to(dtype)
        temb = self.time_mlp(t_features)  # (B, h)
        tokens = torch.cat(
            [
                proj(norm(e)) + pos
                for e, norm, proj, pos in zip(embeds, self.token_norms, self.token_projs, self.positions)
            ],
            dim=1,
        )  # (B, sum T_s, h)
        pooled_tokens = tokens.mean(dim=1)  # (B, h)
        query = (z + temb).unsqueeze(1)  # (B, 1, h)
        attended, _ = self.cross_attention(query, tokens, tokens, need_weights=False)
        features = [z, temb, pooled_tokens, attended.squeeze(1)]
        if cfg.pooled_dim:
            features.append(self.pooled_proj(self.pooled_norm(cond.pooled.to(dtype))))  # type: ignore[union-attr]
        fused = torch.cat(features, dim=-1)  # (B, parts * h)

        if cfg.capacity.classifier_encoder == "own":  # each member on the latent and timestep alone
            logit = mean_probability_logit(
                torch.stack(
                    [self._member_logit(p, pooled_latent, t_features) for p in member_prefixes(cfg.capacity)]
                )
            )
        else:
            logit = self.classifier(fused[:, : self.classifier_parts * h]).squeeze(-1)
        context = self.context(fused)
        per_token = tokens + context.unsqueeze(1)  # (B, sum T_s, h)
        for layer in self.token_layers:
            per_token = layer(per_token)
        per_token = self.token_mixer(per_token)
        directions, masks = [], []
        offset = 0
        for e, stream, up in zip(embeds, cfg.streams, self.delta_ups):
            own = per_token[:, offset : offset + stream.seq_len]  # this stream's tokens
            offset += stream.seq_len
            direction = up(self.delta_down(own))
            if cfg.capacity.token_layers:  # copy head: move toward a mix of the stream's token embeddings
                scores = self.copy_query(own) @ self.copy_key(own).transpose(1, 2) / math.sqrt(h)
                copied = scores.softmax(dim=-1) @ e  # (B, T_s, D_s)
                direction = direction + torch.sigmoid(self.copy_gate(own)) * (copied - e)
            directions.append(direction)
            masks.append(torch.sigmoid(self.mask_head(own).squeeze(-1)))
        alpha = torch.sigmoid(self.scale_head(context).squeeze(-1))
        pooled_direction = pooled_mask = None
        if cfg.pooled_dim:
            pooled_direction = self.pooled_delta(context)
            pooled_mask = torch.sigmoid(self.pooled_gate(context).squeeze(-1))
        return RedirectorOutput(logit, tuple(directions), tuple(masks), alpha, pooled_direction, pooled_mask)
