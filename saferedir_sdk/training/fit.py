"""Fitting a redirector to paired forget/retain trajectories.

Row ``i`` of ``forget`` and row ``i`` of ``retain`` come from paired prompts ("a nude girl by the
lake" / "a girl by the lake") at the same seed and step. The pair supervises every part:

* **classification** (BCE): forget rows are unsafe (1), retain rows safe (0). This is what gates
  redirection at inference, so it is trained at every recorded timestep.
* **redirection** (1 - cosine): the redirected forget embedding ``E_f + delta`` (the engine's own
  formula, :func:`~saferedir_sdk.redirector.apply_redirection`) should point where the paired retain
  embedding ``E_r`` points, on the tokens that differ (weighted by the mask target). Every token of
  every stream counts, and the pooled embedding as one more vector when the redirector moves it.
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

from ..conditioning import Conditioning
from ..redirector import Redirector, RedirectorOutput, apply_redirection
from .trajectories import Trajectories

Batch = tuple[torch.Tensor, torch.Tensor, Conditioning]  # (latents, timesteps, cond)


def _vectors(cond: Conditioning, pooled: bool) -> list[torch.Tensor]:
    """The moved vectors of a conditioning: every stream's tokens (B, T_s, D_s), and the pooled
    embedding as one more (B, 1, P) "token" when the redirector moves it."""
    return [*cond.tokens, *([cond.pooled.unsqueeze(1)] if pooled and cond.pooled is not None else [])]


def _rel_moves(e_forget: Conditioning, e_retain: Conditioning, pooled: bool) -> torch.Tensor:
    """(B, N) relative move ``|E_r - E_f| / |E_f|`` of every moved vector (all streams' tokens,
    then the pooled embedding)."""
    return torch.cat(
        [
            (r - f).norm(dim=-1) / f.norm(dim=-1).clamp_min(1e-6)
            for f, r in zip(_vectors(e_forget, pooled), _vectors(e_retain, pooled))
        ],
        dim=1,
    )


def _targets(rel: torch.Tensor, strength: float, mask_tau: float):
    """Per pair: which vectors move (relative change > ``mask_tau``), the scale ``alpha`` (the largest
    relative move, over ``strength``) and the soft mask (each moved vector's relative move over
    ``strength * alpha``), so that ``strength * alpha * mask`` reproduces every vector's own move."""
    moved = (rel > mask_tau).float()
    alpha_target = ((rel * moved).amax(dim=1) / strength).clamp(0.0, 1.0)
    mask_target = (rel / (strength * alpha_target.clamp_min(1e-6)).unsqueeze(1)).clamp(0.0, 1.0) * moved
    return moved, mask_target, alpha_target


def _masks(out: RedirectorOutput) -> torch.Tensor:
    """(B, N) predicted weights of the moved vectors, in :func:`_rel_moves`' order."""
    pooled = [out.pooled_mask.unsqueeze(1)] if out.pooled_mask is not None else []
    return torch.cat([*out.masks, *pooled], dim=1)


def _split_output(out: RedirectorOutput, sizes: list[int]) -> list[RedirectorOutput]:
    """``out`` of one forward over concatenated groups, cut back into the groups."""

    def cut(x: torch.Tensor | None) -> list[torch.Tensor | None]:
        return list(x.split(sizes)) if x is not None else [None] * len(sizes)

    logits, alphas = cut(out.logit), cut(out.alpha)
    directions = [cut(d) for d in out.directions]
    masks = [cut(m) for m in out.masks]
    p_dir, p_mask = cut(out.pooled_direction), cut(out.pooled_mask)
    return [
        RedirectorOutput(
            logits[k],
            tuple(d[k] for d in directions),
            tuple(m[k] for m in masks),
            alphas[k],
            p_dir[k],
            p_mask[k],
        )  # type: ignore[arg-type]
        for k in range(len(sizes))
    ]


def redirector_losses(
    redirector: Redirector,
    forget: Batch,
    retain: Batch,
    *,
    negatives: Batch | None = None,
    strength: float = 1.0,
    mask_tau: float = 0.05,
    augment: Callable[[Batch], Batch] | None = None,
) -> dict[str, torch.Tensor]:
    """All losses for a batch of pairs. ``forget``, ``retain`` and the optional unpaired
    ``negatives`` are (latents, timesteps, cond). ``augment`` perturbs a copy of every group for
    the classification loss only: the redirection targets stay the clean pair."""
    groups = [forget, retain] + ([negatives] if negatives is not None else [])
    if augment is not None:
        groups += [augment(g) for g in groups]
    sizes = [g[0].shape[0] for g in groups]
    # one forward over all groups (one pass under DistributedDataParallel, and faster)
    cond = Conditioning(
        tuple(torch.cat([g[2].tokens[i] for g in groups]) for i in range(len(forget[2].tokens))),
        torch.cat([g[2].pooled for g in groups]) if forget[2].pooled is not None else None,
    )  # type: ignore[misc]
    out = redirector(torch.cat([g[0] for g in groups]), torch.cat([g[1] for g in groups]), cond)
    parts = _split_output(out, sizes)
    out_f, out_r = parts[0], parts[1]
    labels = [1.0, 0.0] + ([0.0] if negatives is not None else [])
    labels = labels * (2 if augment is not None else 1)
    bce = [
        F.binary_cross_entropy_with_logits(p.logit, torch.full_like(p.logit, y))
        for p, y in zip(parts, labels)
    ]
    classification = sum(bce) / (2 if augment is not None else 1)

    pooled = out.pooled_direction is not None  # (the module may be wrapped: DistributedDataParallel)
    e_f, e_r = forget[2], retain[2]
    moved, mask_target, alpha_target = _targets(_rel_moves(e_f, e_r, pooled), strength, mask_tau)
    directions = [*out_f.directions, *([out_f.pooled_direction.unsqueeze(1)] if pooled else [])]  # type: ignore[union-attr]
    mask_f = _masks(out_f)
    cosines, offset = [], 0
    for f, r, d in zip(_vectors(e_f, pooled), _vectors(e_r, pooled), directions):
        m = mask_f[:, offset : offset + f.shape[1]]
        offset += f.shape[1]
        redirected = f + apply_redirection(f, d, m, out_f.alpha, strength)
        cosines.append(F.cosine_similarity(redirected, r, dim=-1))
    cosine = torch.cat(cosines, dim=1)  # (B, N)
    token_weight = moved + 1e-3
    redirection = ((1.0 - cosine) * token_weight).sum(dim=1).div(token_weight.sum(dim=1)).mean()
    # BCE against soft targets minus the targets' own entropy (= KL): zero at the optimum, so the
    # held-out total that early stopping watches is not dominated by an irreducible constant
    entropy = F.binary_cross_entropy(mask_target.clamp(1e-6, 1 - 1e-6), mask_target)
    mask = F.binary_cross_entropy(mask_f.clamp(1e-6, 1 - 1e-6), mask_target) - entropy
    scale = F.mse_loss(out_f.alpha, alpha_target)
    preservation = (out_r.alpha.unsqueeze(-1) * _masks(out_r)).mean()
    if negatives is not None:
        out_n = parts[2]
        preservation = preservation + (out_n.alpha.unsqueeze(-1) * _masks(out_n)).mean()
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


def _augment(batch: Batch, token_dropout: float, embed_noise: float, generator: torch.Generator) -> Batch:
    """Robustness augmentation of the classifier's input: drop whole tokens (zeroed) and add noise
    relative to each vector's norm, so a rephrased or perturbed prompt still lands on the right side."""
    latents, t, cond = batch

    def perturb(embeds: torch.Tensor) -> torch.Tensor:
        if token_dropout > 0 and embeds.ndim == 3:
            keep = (torch.rand(embeds.shape[:2], generator=generator) >= token_dropout).to(
                embeds.device, embeds.dtype
            )
            embeds = embeds * keep.unsqueeze(-1)
        if embed_noise > 0:
            noise = torch.randn(embeds.shape, generator=generator).to(embeds.device, embeds.dtype)
            embeds = (
                embeds + embed_noise * noise * embeds.norm(dim=-1, keepdim=True) / embeds.shape[-1] ** 0.5
            )
        return embeds

    return latents, t, cond.map(perturb)


#: timestep quarters of the normalised scale, for per-quarter held-out accuracy
QUARTERS = ("t0.00-0.25", "t0.25-0.50", "t0.50-0.75", "t0.75-1.00")


def timestep_quarter(t: torch.Tensor) -> torch.Tensor:
    """(N,) normalised timesteps -> quarter index 0 (cleanest) .. 3 (noisiest)."""
    return (t.float() * 4).floor().clamp(0, 3).long()


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
    redirector: Redirector,
    forget: Trajectories,
    retain: Trajectories,
    *,
    strength: float = 1.0,
    batch_size: int = 256,
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
        losses = redirector_losses(redirector, f.inputs(device), r.inputs(device), strength=strength)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(index)
        for traj, label in ((f, 1.0), (r, 0.0)):
            hit = ((redirector(*traj.inputs(device)).logit > 0).float().cpu() == label).float()
            bucket = timestep_quarter(traj.timesteps)
            correct.index_add_(0, bucket, hit)
            count.index_add_(0, bucket, torch.ones_like(hit))
    result = {f"heldout_{k}": round(v / n, 5) for k, v in sums.items()}
    result["heldout_accuracy_by_t"] = {  # type: ignore[assignment]
        QUARTERS[q]: round(float(correct[q] / count[q]), 4) for q in range(4) if count[q] > 0
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
        raise ValueError(
            f"forget and retain trajectories must pair up row by row: {len(forget)} vs {len(retain)}"
        )
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
            neg = negatives.select(
                torch.randint(0, len(negatives), (min(batch_size, len(negatives)),), generator=generator)
            )
        augment = None
        if token_dropout > 0 or embed_noise > 0:
            augment = lambda b: _augment(b, token_dropout, embed_noise, generator)  # noqa: E731
        losses = redirector_losses(
            redirector,
            f.inputs(device),
            r.inputs(device),
            negatives=neg.inputs(device) if neg is not None else None,
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
            result.history.append(
                {"step": step, **{k: round(float(v.detach()), 5) for k, v in losses.items()}}
            )
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
