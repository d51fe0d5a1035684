"""Fitting a redirector to paired forget/retain trajectories.

Row ``i`` of ``forget`` and row ``i`` of ``retain`` come from paired prompts ("a nude girl by the
lake" / "a girl by the lake") at the same seed and step. The pair supervises every part:

* **classification** (BCE): forget rows are unsafe (1), retain rows safe (0). This is what gates
  redirection at inference, so it is trained at every recorded timestep.
* **redirection** (1 - cosine): the redirected forget embedding ``E_f + delta`` (the engine's own
  formula, :func:`~saferedir_sdk.redirector.apply_redirection`) should point where the paired retain
  embedding ``E_r`` points, on the tokens that differ (weighted by the mask target).
* **mask** (BCE with soft targets, less their entropy): 0 on tokens whose embedding moves by less than ``mask_tau`` of its
  norm between ``E_f`` and ``E_r`` (it keeps them, hence fidelity); on the others the token's own
  relative move ``|E_r - E_f| / |E_f|`` divided by ``strength * alpha``, so each token moves as far
  as its pair says (a contextual encoder moves the concept word far and its neighbours a little).
* **scale** (MSE): target ``alpha = max |E_r - E_f| / (strength * |E_f|)`` over the moved tokens,
  clipped to [0, 1]: how far the pair says to move the token that moves most.
* **preservation**: on retain rows the predicted movement ``alpha * m`` should be zero, so a
  misfiring classifier moves benign prompts as little as possible.

An optional unpaired **retain pool** (``negatives``: benign prompts unrelated to the concept, like
the IGMU Church set's retain list) adds classification (label 0) and preservation terms, so the
classifier learns what "not the concept" looks like beyond the paired neighbours.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from ..redirector import Redirector, RedirectorOutput, apply_redirection
from .trajectories import Trajectories

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _targets(e_forget: torch.Tensor, e_retain: torch.Tensor, strength: float, mask_tau: float):
    """Per pair: which tokens move (relative change > ``mask_tau``), the scale ``alpha`` (the largest
    relative move, over ``strength``) and the soft mask (each moved token's relative move over
    ``strength * alpha``), so that ``strength * alpha * mask`` reproduces every token's own move."""
    rel = (e_retain - e_forget).norm(dim=-1) / e_forget.norm(dim=-1).clamp_min(1e-6)  # (B, T)
    moved = (rel > mask_tau).float()
    alpha_target = ((rel * moved).amax(dim=1) / strength).clamp(0.0, 1.0)
    mask_target = (rel / (strength * alpha_target.clamp_min(1e-6)).unsqueeze(1)).clamp(0.0, 1.0) * moved
    return moved, mask_target, alpha_target


def redirector_losses(
    redirector: Redirector,
    forget: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    retain: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    negatives: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    strength: float = 1.0,
    mask_tau: float = 0.05,
    augment: Callable[[Batch], Batch] | None = None,
) -> dict[str, torch.Tensor]:
    """All losses for a batch of pairs. ``forget``, ``retain`` and the optional unpaired
    ``negatives`` are (latents, timesteps, embeds). ``augment`` perturbs a copy of every group for
    the classification loss only: the redirection targets stay the clean pair."""
    groups = [forget, retain] + ([negatives] if negatives is not None else [])
    if augment is not None:
        groups += [augment(g) for g in groups]
    sizes = [g[2].shape[0] for g in groups]
    # one forward over all groups (one pass under DistributedDataParallel, and faster)
    out = redirector(*(torch.cat([g[i] for g in groups]) for i in range(3)))  # timesteps are (B,) per group
    parts = [RedirectorOutput(*(x.split(sizes)[k] for x in out)) for k in range(len(groups))]
    out_f, out_r = parts[0], parts[1]
    e_f, e_r = forget[2], retain[2]
    labels = [1.0, 0.0] + ([0.0] if negatives is not None else [])
    labels = labels * (2 if augment is not None else 1)
    bce = [F.binary_cross_entropy_with_logits(p.logit, torch.full_like(p.logit, y)) for p, y in zip(parts, labels)]
    classification = sum(bce) / (2 if augment is not None else 1)
    moved, mask_target, alpha_target = _targets(e_f, e_r, strength, mask_tau)
    redirected = e_f + apply_redirection(e_f, out_f.direction, out_f.mask, out_f.alpha, strength)
    cosine = F.cosine_similarity(redirected, e_r, dim=-1)  # (B, T)
    token_weight = moved + 1e-3
    redirection = ((1.0 - cosine) * token_weight).sum(dim=1).div(token_weight.sum(dim=1)).mean()
    # BCE against soft targets minus the targets' own entropy (= KL): zero at the optimum, so the
    # held-out total that early stopping watches is not dominated by an irreducible constant
    entropy = F.binary_cross_entropy(mask_target.clamp(1e-6, 1 - 1e-6), mask_target)
    mask = F.binary_cross_entropy(out_f.mask.clamp(1e-6, 1 - 1e-6), mask_target) - entropy
    scale = F.mse_loss(out_f.alpha, alpha_target)
    preservation = (out_r.alpha.unsqueeze(-1) * out_r.mask).mean()
    if negatives is not None:
        out_n = parts[2]
        preservation = preservation + (out_n.alpha.unsqueeze(-1) * out_n.mask).mean()
    total = classification + redirection + mask + scale + preservation
    accuracy = 0.5 * ((out_f.logit > 0).float().mean() + (out_r.logit <= 0).float().mean())
    masked_cos = (cosine * moved).sum() / moved.sum().clamp_min(1.0)
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


def _augment(
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], token_dropout: float, embed_noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Robustness augmentation of the classifier's input: drop whole tokens (zeroed) and add noise
    relative to each token's norm, so a rephrased or perturbed prompt still lands on the right side."""
    latents, t, embeds = batch
    if token_dropout > 0:
        keep = (torch.rand(embeds.shape[:2], generator=generator) >= token_dropout).to(embeds.device, embeds.dtype)
        embeds = embeds * keep.unsqueeze(-1)
    if embed_noise > 0:
        noise = torch.randn(embeds.shape, generator=generator).to(embeds.device, embeds.dtype)
        embeds = embeds + embed_noise * noise * embeds.norm(dim=-1, keepdim=True) / embeds.shape[-1] ** 0.5
    return latents, t, embeds


@dataclass
class FitResult:
    """Loss history and final figures of a fit. ``heldout`` holds the best held-out evaluation."""

    steps: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    heldout: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


@torch.no_grad()
def evaluate_redirector(
    redirector: Redirector, forget: Trajectories, retain: Trajectories, *, strength: float = 1.0, batch_size: int = 256
) -> dict[str, float]:
    """Held-out figures: losses, classifier accuracy (overall and per timestep quarter) and the
    redirection cosine to the paired retain embedding on the tokens the pair changes."""
    was_training = redirector.training
    redirector.eval()
    device = next(redirector.parameters()).device
    sums: dict[str, float] = {}
    correct = torch.zeros(4)
    count = torch.zeros(4)
    n = len(forget)
    for i in range(0, n, batch_size):
        index = torch.arange(i, min(n, i + batch_size))
        f, r = forget.select(index), retain.select(index)
        losses = redirector_losses(redirector, _inputs(f, device), _inputs(r, device), strength=strength)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(index)
        for traj, label in ((f, 1.0), (r, 0.0)):
            hit = ((redirector(*_inputs(traj, device)).logit > 0).float().cpu() == label).float()
            bucket = (traj.timesteps.clamp(0, 999) // 250).long()
            correct.index_add_(0, bucket, hit)
            count.index_add_(0, bucket, torch.ones_like(hit))
    result = {f"heldout_{k}": round(v / n, 5) for k, v in sums.items()}
    result["heldout_accuracy_by_t"] = {  # type: ignore[assignment]
        f"t{q * 250}-{q * 250 + 249}": round(float(correct[q] / count[q]), 4) for q in range(4) if count[q] > 0
    }
    redirector.train(was_training)
    return result


def fit_redirector(
    redirector: Redirector,
    forget: Trajectories,
    retain: Trajectories,
    *,
    negatives: Trajectories | None = None,
    heldout: tuple[Trajectories, Trajectories] | None = None,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 1e-3,
    strength: float = 1.0,
    token_dropout: float = 0.0,
    embed_noise: float = 0.0,
    eval_every: int = 100,
    patience: int = 0,
    seed: int = 0,
    log_every: int = 50,
    accelerator: Any = None,
    progress: bool = False,
) -> FitResult:
    """Train ``redirector`` in place on paired trajectories (row i of ``forget`` and ``retain`` is a
    pair), with an optional unpaired retain pool ``negatives``.

    With ``heldout`` pairs it evaluates every ``eval_every`` steps, keeps the weights with the
    lowest held-out loss and, if ``patience`` > 0, stops after that many evaluations without
    improvement. With an ``accelerate.Accelerator`` the model and optimizer are prepared by it
    (several processes: each draws its own batches, gradients are averaged).
    """
    if len(forget) != len(retain):
        raise ValueError(f"forget and retain trajectories must pair up row by row: {len(forget)} vs {len(retain)}")
    rank = accelerator.process_index if accelerator is not None else 0
    generator = torch.Generator().manual_seed(seed + 1000 * rank)
    base = redirector
    optimizer = torch.optim.AdamW(redirector.parameters(), lr=lr, weight_decay=1e-4)
    base.train().requires_grad_(True)
    if accelerator is not None:
        redirector, optimizer = accelerator.prepare(redirector, optimizer)
    device = next(base.parameters()).device
    result = FitResult(steps=steps, seconds=0.0)
    best_loss, best_state, stale = float("inf"), None, 0
    bar = None
    if progress and (accelerator is None or accelerator.is_main_process):
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fit redirector", unit="step", mininterval=2.0)
    start = time.perf_counter()
    n = len(forget)
    for step in range(steps):
        index = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        f, r = forget.select(index), retain.select(index)
        neg = None
        if negatives is not None and len(negatives):
            neg = negatives.select(torch.randint(0, len(negatives), (min(batch_size, len(negatives)),), generator=generator))
        augment = None
        if token_dropout > 0 or embed_noise > 0:
            augment = lambda b: _augment(b, token_dropout, embed_noise, generator)  # noqa: E731
        losses = redirector_losses(
            redirector,
            _inputs(f, device),
            _inputs(r, device),
            negatives=_inputs(neg, device) if neg is not None else None,
            strength=strength,
            augment=augment,
        )
        optimizer.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(losses["total"])
        else:
            losses["total"].backward()
        optimizer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(losses['total'].detach()):.4f}", refresh=False)
        if step % log_every == 0 or step == steps - 1:
            result.history.append({"step": step, **{k: round(float(v.detach()), 5) for k, v in losses.items()}})
        if heldout is not None and ((step + 1) % eval_every == 0 or step == steps - 1):
            figures = evaluate_redirector(base, *heldout, strength=strength)
            if figures["heldout_total"] < best_loss:
                best_loss, stale = figures["heldout_total"], 0
                best_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
                result.heldout = {**figures, "step": step + 1}
            else:
                stale += 1
                if patience and stale >= patience:
                    result.stopped_early = True
                    result.steps = step + 1
                    break
    if bar is not None:
        bar.close()
    if best_state is not None:
        base.load_state_dict(best_state)
    base.eval().requires_grad_(False)
    result.seconds = time.perf_counter() - start
    result.final = {k: v for k, v in result.history[-1].items() if k != "step"}
    return result
