"""The SafeRedir redirector: one small network per concept and backbone.

Per denoising step it reads the current latent ``z_t``, the timestep ``t`` and the conditional
prompt embeddings ``E`` (tokens x dim) and predicts, in four parts:

* a latent-aware multimodal **classifier**: p(unsafe) from latent features, the timestep and the
  prompt (pooled, and cross-attended by the latent/time query);
* a token-level **delta generator**: a per-token direction ``D``: a low-rank head, plus (with
  ``token_layers`` > 0) a copy head that points a token at an attention-weighted mix of the
  prompt's other token embeddings. Both read token features mixed by self-attention over the
  prompt, because a contextual text encoder moves every token when one word changes, by an amount
  that depends on that word, and a pair whose phrasings differ in length shifts the later tokens;
* a token **mask predictor**: ``m`` in [0, 1] per token, which tokens to move;
* an adaptive **scale predictor**: ``alpha`` in [0, 1], how far to move.

Redirected embeddings: ``E' = E + s * alpha * m * normalize(D) * |E|`` per token, with ``s`` the
policy's strength (:func:`apply_redirection`). Every size comes from :class:`RedirectorConfig`,
which is built from the backbone; nothing is fixed to 768/77/4.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .errors import TensorShapeError


@dataclass(frozen=True)
class RedirectorConfig:
    """Architecture of a redirector. ``token_dim``, ``seq_len`` and ``latent_channels`` come from
    the backbone; the rest are capacity choices."""

    token_dim: int
    seq_len: int
    latent_channels: int
    hidden_dim: int = 256
    rank: int = 16
    num_heads: int = 4
    latent_pool: int = 16
    num_train_timesteps: int = 1000
    # self-attention layers over the prompt's tokens before the token heads, and the copy head;
    # 0: neither (the layout of bundles written before they existed)
    token_layers: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            least = 0 if f.name == "token_layers" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"RedirectorConfig.{f.name}: expected an int >= {least}, got {value!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"RedirectorConfig.hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})"
            )

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RedirectorConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RedirectorConfig keys: {sorted(unknown)}")
        # bundles written before token mixing existed do not record token_layers and have none
        return cls(**{"token_layers": 0, **data})


class RedirectorOutput(NamedTuple):
    """What a redirector predicts for a batch of B samples with T tokens of D dims."""

    logit: torch.Tensor  # (B,) unsafe logit; p(unsafe) = sigmoid(logit)
    direction: torch.Tensor  # (B, T, D) raw delta D (normalised per token when applied)
    mask: torch.Tensor  # (B, T) in [0, 1]
    alpha: torch.Tensor  # (B,) in [0, 1]


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
    embeds: torch.Tensor, direction: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor, strength: float | torch.Tensor
) -> torch.Tensor:
    """The redirection delta ``s * alpha * m * normalize(D) * |E|`` for every token.

    Args:
        embeds: (B, T, D) conditional prompt embeddings ``E``.
        direction: (B, T, D) raw delta ``D``.
        mask: (B, T) token weights ``m``.
        alpha: (B,) scales.
        strength: the policy's ``s`` (float, or (B,) tensor).

    Returns:
        (B, T, D) delta to add to ``embeds`` (same dtype as ``direction``).
    """
    unit = F.normalize(direction, dim=-1, eps=1e-6)
    norm = embeds.to(direction.dtype).norm(dim=-1, keepdim=True)
    if isinstance(strength, torch.Tensor):
        strength = strength.to(direction.dtype).view(-1, 1, 1)
    return strength * alpha.view(-1, 1, 1) * mask.unsqueeze(-1) * unit * norm


class Redirector(nn.Module):
    """SafeRedir redirector for one concept. See the module docstring for the four parts."""

    def __init__(self, config: RedirectorConfig):
        super().__init__()
        self.config = config
        h = config.hidden_dim
        c_mid = max(32, h // 4)
        # latent encoder: pooled to latent_pool x latent_pool, two convolutions, global mean
        self.latent_pool = nn.AdaptiveAvgPool2d(config.latent_pool)
        self.latent_encoder = nn.Sequential(
            nn.Conv2d(config.latent_channels, c_mid, 3, padding=1),
            nn.GroupNorm(8 if c_mid % 8 == 0 else 1, c_mid),
            nn.SiLU(),
            nn.Conv2d(c_mid, h, 3, stride=2, padding=1),
            nn.SiLU(),
        )
        self.latent_proj = nn.Linear(h, h)
        self.time_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.token_norm = nn.LayerNorm(config.token_dim)
        self.token_proj = nn.Linear(config.token_dim, h)
        self.position = nn.Parameter(torch.zeros(config.seq_len, h))
        self.cross_attention = nn.MultiheadAttention(h, config.num_heads, batch_first=True)
        # classifier over [latent, time, pooled prompt, attended prompt]
        self.classifier = nn.Sequential(nn.Linear(4 * h, h), nn.SiLU(), nn.Linear(h, h // 2), nn.SiLU(), nn.Linear(h // 2, 1))
        self.context = nn.Linear(4 * h, h)
        # token-level heads, conditioned on the fused context and mixed across tokens
        self.token_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(h, config.num_heads, 2 * h, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            for _ in range(config.token_layers)
        )
        self.token_mixer = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.SiLU())
        if config.token_layers:
            self.copy_query = nn.Linear(h, h)
            self.copy_key = nn.Linear(h, h)
            self.copy_gate = nn.Linear(h, 1)
            nn.init.constant_(self.copy_gate.bias, -2.0)
        self.delta_down = nn.Linear(h, config.rank)
        self.delta_up = nn.Linear(config.rank, config.token_dim)
        self.mask_head = nn.Sequential(nn.Linear(h, h // 2), nn.SiLU(), nn.Linear(h // 2, 1))
        self.scale_head = nn.Sequential(nn.Linear(h, h // 2), nn.SiLU(), nn.Linear(h // 2, 1))

    def check_inputs(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> None:
        """Raise :class:`TensorShapeError` naming the tensor whose shape does not fit the config."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[1] != cfg.latent_channels:
            raise TensorShapeError("latents", f"(B, {cfg.latent_channels}, H, W)", tuple(latents.shape))
        b = latents.shape[0]
        if embeds.ndim != 3 or embeds.shape[0] != b or embeds.shape[1:] != (cfg.seq_len, cfg.token_dim):
            raise TensorShapeError("encoder_hidden_states", f"({b}, {cfg.seq_len}, {cfg.token_dim})", tuple(embeds.shape))
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, b)):
            raise TensorShapeError("timestep", f"() or ({b},)", tuple(timestep.shape))

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> RedirectorOutput:
        """
        Args:
            latents: (B, C, H, W) current latent ``z_t`` (the conditional sample's).
            timestep: () or (B,) diffusion timestep(s), in scheduler units (0..num_train_timesteps).
            embeds: (B, T, D) conditional prompt embeddings.
        """
        self.check_inputs(latents, timestep, embeds)
        b = latents.shape[0]
        dtype = self.position.dtype
        latents, embeds = latents.to(dtype), embeds.to(dtype)
        t = timestep.reshape(-1).expand(b) if timestep.ndim else timestep.reshape(1).expand(b)
        h = self.config.hidden_dim

        z = self.latent_encoder(self.latent_pool(latents)).mean(dim=(2, 3))  # (B, h)
        z = self.latent_proj(z)
        temb = self.time_mlp(timestep_embedding(t, h).to(dtype))  # (B, h)
        tokens = self.token_proj(self.token_norm(embeds)) + self.position  # (B, T, h)
        pooled = tokens.mean(dim=1)  # (B, h)
        query = (z + temb).unsqueeze(1)  # (B, 1, h)
        attended, _ = self.cross_attention(query, tokens, tokens, need_weights=False)
        fused = torch.cat([z, temb, pooled, attended.squeeze(1)], dim=-1)  # (B, 4h)

        logit = self.classifier(fused).squeeze(-1)
        context = self.context(fused)
        per_token = tokens + context.unsqueeze(1)  # (B, T, h)
        for layer in self.token_layers:
            per_token = layer(per_token)
        per_token = self.token_mixer(per_token)
        direction = self.delta_up(self.delta_down(per_token))
        if self.config.token_layers:  # copy head: move toward a mix of the prompt's token embeddings
            scores = self.copy_query(per_token) @ self.copy_key(per_token).transpose(1, 2) / math.sqrt(h)
            copied = scores.softmax(dim=-1) @ embeds  # (B, T, D)
            direction = direction + torch.sigmoid(self.copy_gate(per_token)) * (copied - embeds)
        mask = torch.sigmoid(self.mask_head(per_token).squeeze(-1))
        alpha = torch.sigmoid(self.scale_head(context).squeeze(-1))
        return RedirectorOutput(logit=logit, direction=direction, mask=mask, alpha=alpha)
