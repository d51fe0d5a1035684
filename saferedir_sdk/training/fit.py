"""Fitting a redirector to paired forget/retain trajectories.

Row ``i`` of ``forget`` and row ``i`` of ``retain`` come from paired prompts ("a nude girl by the
lake" / "a girl by the lake") at the same seed and step. The pair supervises every part:

* **classification** (BCE): forget rows are unsafe (1), retain rows safe (0). This is what gates
  redirection at inference, so it is trained at every recorded timestep.
* **redirection** (1 - cosine): the redirected forget embedding ``E_f + delta`` (the engine's own
  formula, :func:`~saferedir_sdk.redirector.apply_redirection`) should point where the paired retain
  embedding ``E_r`` points, on the tokens that differ (weighted by the mask target).
* **mask** (BCE): target 1 on tokens whose embedding moves by more than ``mask_tau`` of its norm
  between ``E_f`` and ``E_r``, 0 elsewhere. It keeps the other tokens, hence fidelity.
* **scale** (MSE): target ``alpha = mean |E_r - E_f| / (strength * |E_f|)`` over the masked tokens,
  clipped to [0, 1]: how far the pair says to move.
* **preservation**: on retain rows the predicted movement ``alpha * m`` should be zero, so a
  misfiring classifier moves benign prompts as little as possible.

An optional unpaired **retain pool** (``negatives``: benign prompts unrelated to the concept, like
the IGMU Church set's retain list) adds classification (label 0) and preservation terms, so the
classifier learns what "not the concept" looks like beyond the paired neighbours.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..redirector import Redirector, apply_redirection
from .trajectories import Trajectories


@dataclass
class FitResult:
    """Loss history and final figures of a fit."""

    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)


def _targets(e_forget: torch.Tensor, e_retain: torch.Tensor, strength: float, mask_tau: float):
    diff = (e_retain - e_forget).norm(dim=-1)  # (B, T)
    norm = e_forget.norm(dim=-1).clamp_min(1e-6)
    mask_target = (diff / norm > mask_tau).float()
    weight = mask_target.sum(dim=1).clamp_min(1.0)
    alpha_target = ((diff / norm * mask_target).sum(dim=1) / weight / strength).clamp(0.0, 1.0)
    return mask_target, alpha_target


def redirector_losses(
    redirector: Redirector,
    forget: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    retain: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    negatives: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    strength: float = 1.0,
    mask_tau: float = 0.05,
) -> dict[str, torch.Tensor]:
    """All losses for a batch of pairs. ``forget``, ``retain`` and the optional unpaired
    ``negatives`` are (latents, timesteps, embeds)."""
    lat_f, t_f, e_f = forget
    lat_r, t_r, e_r = retain
    out_f = redirector(lat_f, t_f, e_f)
    out_r = redirector(lat_r, t_r, e_r)
    classification = F.binary_cross_entropy_with_logits(out_f.logit, torch.ones_like(out_f.logit)) + (
        F.binary_cross_entropy_with_logits(out_r.logit, torch.zeros_like(out_r.logit))
    )
    mask_target, alpha_target = _targets(e_f, e_r, strength, mask_tau)
    redirected = e_f + apply_redirection(e_f, out_f.direction, out_f.mask, out_f.alpha, strength)
    cosine = F.cosine_similarity(redirected, e_r, dim=-1)  # (B, T)
    token_weight = mask_target + 1e-3
    redirection = ((1.0 - cosine) * token_weight).sum(dim=1).div(token_weight.sum(dim=1)).mean()
    mask = F.binary_cross_entropy(out_f.mask.clamp(1e-6, 1 - 1e-6), mask_target)
    scale = F.mse_loss(out_f.alpha, alpha_target)
    preservation = (out_r.alpha.unsqueeze(-1) * out_r.mask).mean()
    if negatives is not None:
        out_n = redirector(*negatives)
        classification = classification + F.binary_cross_entropy_with_logits(out_n.logit, torch.zeros_like(out_n.logit))
        preservation = preservation + (out_n.alpha.unsqueeze(-1) * out_n.mask).mean()
    total = classification + redirection + mask + scale + preservation
    accuracy = 0.5 * ((out_f.logit > 0).float().mean() + (out_r.logit <= 0).float().mean())
    masked_cos = (cosine * mask_target).sum() / mask_target.sum().clamp_min(1.0)
    return {
        "total": total,
        "classification": classification,
        "redirection": redirection,
        "mask": mask,
        "scale": scale,
        "preservation": preservation,
        "accuracy": accuracy.detach(),
        "masked_cosine": masked_cos.detach(),
    }


def _inputs(t: Trajectories, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return t.latents.to(device), t.timesteps.to(device), t.embeds.to(device)


def fit_redirector(
    redirector: Redirector,
    forget: Trajectories,
    retain: Trajectories,
    *,
    negatives: Trajectories | None = None,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    strength: float = 1.0,
    seed: int = 0,
    log_every: int = 50,
) -> FitResult:
    """Train ``redirector`` in place on paired trajectories (row i of each is a pair), plus an
    optional unpaired retain pool ``negatives``."""
    if len(forget) != len(retain):
        raise ValueError(f"forget and retain trajectories must pair up row by row: {len(forget)} vs {len(retain)}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(redirector.parameters(), lr=lr, weight_decay=1e-4)
    redirector.train().requires_grad_(True)
    device = next(redirector.parameters()).device
    result = FitResult(steps=steps, seconds=0.0)
    start = time.perf_counter()
    n = len(forget)
    for step in range(steps):
        index = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        f = forget.select(index)
        r = retain.select(index)
        neg = None
        if negatives is not None:
            neg = negatives.select(torch.randint(0, len(negatives), (min(batch_size, len(negatives)),), generator=generator))
        losses = redirector_losses(
            redirector,
            _inputs(f, device),
            _inputs(r, device),
            negatives=_inputs(neg, device) if neg is not None else None,
            strength=strength,
        )
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            result.history.append({"step": step, **{k: round(float(v.detach()), 5) for k, v in losses.items()}})
    redirector.eval().requires_grad_(False)
    result.seconds = time.perf_counter() - start
    result.final = {k: v for k, v in result.history[-1].items() if k != "step"}
    return result
