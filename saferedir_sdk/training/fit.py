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
* **counterfactual classification** (BCE, optional ``swap``): late in the schedule a pair's two
  rows are also shown with their prompts exchanged, the forget row's latent under the retain prompt
  and the other way round, each labelled by what *its latent* became. Both rows share seed and step,
  so nothing but the latent tells them apart: where the words and the image disagree, the image must
  win. Without it a classifier fitted to paired prompts can decide every step from the words alone
  (a negation it never saw, "... anything but asterisk", kept p(unsafe) = 1.00 to the last check
  over a triangle). Off by default: on the Shapes bundles it made the late decision follow the
  image and cost erasure (benchmarks/README.md, "Retrain variance").
* **classified** (BCE, optional): labelled rows that are classified and nothing else: trajectories
  the guard redirected (a refit's ``refine_steps``) and blends (``TrainConfig.blends``, blends.py: a
  forget generation's path mixed with a retain-side one's from the same noise, images on the boundary
  between the concept and what is not), each labelled by what its image became.

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

from ..capacity import TRAINABLE
from ..conditioning import Conditioning
from ..redirector import Redirector, RedirectorOutput, apply_redirection
from .renoise import Renoiser
from .trajectories import Trajectories

Batch = tuple[torch.Tensor, torch.Tensor, Conditioning, torch.Tensor]  # (latents, timesteps, cond, labels)


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


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of (B,) ``values`` weighted by (B,) ``weights`` (0 when every weight is 0)."""
    return (values * weights).sum() / weights.sum().clamp_min(1e-6)


def redirector_losses(
    redirector: Redirector,
    forget: Batch,
    retain: Batch,
    *,
    negatives: Batch | None = None,
    strength: float = 1.0,
    mask_tau: float = 0.05,
    augment: Callable[[Batch], Batch] | None = None,
    swap: torch.Tensor | None = None,
    classified: Batch | None = None,
) -> dict[str, torch.Tensor]:
    """All losses for a batch of pairs. ``forget``, ``retain`` and the optional unpaired
    ``negatives`` are (latents, timesteps, cond, labels): row ``i`` of ``forget`` and ``retain`` is a
    pair, ``labels`` (B,) the classification target of each row (its outcome label, or 1 / 0 by
    side). A pair teaches redirection only where its forget row is unsafe and its retain row safe;
    every safe row of any group is kept still (preservation). ``augment`` perturbs a copy of every
    group for the classification loss only: the redirection targets stay the clean pair. ``swap``
    (B,) bool picks the pairs that are also classified with their prompts exchanged (the
    counterfactual term: each latent keeps its own label). ``classified``: labelled rows classified
    only (the ``classified`` term): of trajectories the guard redirected
    (:func:`~saferedir_sdk.training.trajectories.record_trajectories` with an engine), where
    redirection already ran, or blends (:func:`~saferedir_sdk.training.blends.blend_trajectories`),
    whose conditioning is no prompt's: they teach neither redirection nor preservation."""
    groups = [forget, retain] + ([negatives] if negatives is not None else [])
    if augment is not None:
        groups += [augment(g) for g in groups]
    n_plain = len(groups)
    if swap is not None and bool(swap.any()):
        for latent_side, prompt_side in ((forget, retain), (retain, forget)):
            groups.append(
                (latent_side[0][swap], latent_side[1][swap], prompt_side[2].rows(swap), latent_side[3][swap])
            )
    n_counter = len(groups)
    if classified is not None:
        groups.append(classified)
    sizes = [g[0].shape[0] for g in groups]
    # one forward over all groups (one pass under DistributedDataParallel, and faster)
    cond = Conditioning(
        tuple(torch.cat([g[2].tokens[i] for g in groups]) for i in range(len(forget[2].tokens))),
        torch.cat([g[2].pooled for g in groups]) if forget[2].pooled is not None else None,
    )  # type: ignore[misc]
    out = redirector(torch.cat([g[0] for g in groups]), torch.cat([g[1] for g in groups]), cond)
    parts = _split_output(out, sizes)
    out_f, out_r = parts[0], parts[1]
    bce = [F.binary_cross_entropy_with_logits(p.logit, g[3].to(p.logit.dtype)) for p, g in zip(parts, groups)]
    classification = sum(bce[:n_plain]) / (2 if augment is not None else 1)
    zero = torch.zeros((), device=out.logit.device)
    counterfactual = sum(bce[n_plain:n_counter]) / 2 if n_counter > n_plain else zero
    on_classified = bce[n_counter] if classified is not None else zero

    pooled = out.pooled_direction is not None  # (the module may be wrapped: DistributedDataParallel)
    e_f, e_r = forget[2], retain[2]
    y_f, y_r = forget[3], retain[3]
    pair_weight = y_f * (1.0 - y_r)  # a redirection example: forget drawn as the concept, retain not
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
    redirection = _weighted_mean(
        ((1.0 - cosine) * token_weight).sum(dim=1) / token_weight.sum(dim=1), pair_weight
    )
    # BCE against soft targets minus the targets' own entropy (= KL): zero at the optimum, so the
    # held-out total that early stopping watches is not dominated by an irreducible constant
    clamped = mask_target.clamp(1e-6, 1 - 1e-6)
    entropy = -(mask_target * clamped.log() + (1 - mask_target) * (1 - clamped).log()).mean(dim=1)
    p_mask = mask_f.clamp(1e-6, 1 - 1e-6)
    cross = -(mask_target * p_mask.log() + (1 - mask_target) * (1 - p_mask).log()).mean(dim=1)
    mask = _weighted_mean(cross - entropy, pair_weight)
    scale = _weighted_mean((out_f.alpha - alpha_target) ** 2, pair_weight)
    preservation = sum(
        ((1.0 - g[3]) * (p.alpha.unsqueeze(-1) * _masks(p)).mean(dim=1)).mean()
        for p, g in zip(parts[: n_plain // (2 if augment is not None else 1)], groups)
    )
    total = classification + counterfactual + on_classified + redirection + mask + scale + preservation
    accuracy = 0.5 * (
        ((out_f.logit > 0) == (y_f > 0.5)).float().mean() + ((out_r.logit > 0) == (y_r > 0.5)).float().mean()
    )
    hit = moved * pair_weight.unsqueeze(1)
    masked_cos = (cosine * hit).sum() / hit.sum().clamp_min(1.0)
    return {
        "total": total,
        "classification": classification,
        "counterfactual": counterfactual,
        "classified": on_classified,
        "redirection": redirection,
        "mask": mask,
        "scale": scale,
        "preservation": preservation,
        "accuracy": accuracy.detach(),
        "masked_cosine": masked_cos.detach(),
    }


def _augment(
    batch: Batch,
    token_dropout: float,
    embed_noise: float,
    generator: torch.Generator,
    prompt_dropout: float = 0.0,
    neutral: Conditioning | None = None,
) -> Batch:
    """Robustness augmentation of the classifier's input: drop whole tokens (zeroed) and add noise
    relative to each vector's norm, so a rephrased or perturbed prompt still lands on the right side;
    and with ``prompt_dropout`` replace a row's whole prompt by the ``neutral`` one (label kept), so
    the classifier must find the concept in the latent where the latent shows it: what makes the
    decision follow the image being formed rather than the words it was trained on."""
    latents, t, cond, labels = batch

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

    cond = cond.map(perturb)
    if prompt_dropout > 0 and neutral is not None:
        b = latents.shape[0]
        drop = (torch.rand(b, generator=generator) < prompt_dropout).to(latents.device)
        blank = neutral.map(lambda x: x.to(latents.device, x.dtype).expand(b, *x.shape[1:]))
        cond = blank.where(drop, cond)
    return latents, t, cond, labels


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
    renoise: dict[str, float] = field(default_factory=dict)  # Renoiser.summary() when renoising


@torch.no_grad()
def classifier_ablation(
    redirector: Redirector, rows: Trajectories, *, neutral: Conditioning | None = None, batch_size: int = 256
) -> dict[str, dict[str, float]]:
    """What the classifier's decision rests on: its accuracy against the rows' labels per timestep
    quarter with the real inputs (``real``), with the latents shuffled across the rows (a fixed
    permutation: ``shuffled_latent``), with the prompts shuffled across the rows (the same
    permutation, each latent keeping its own label: ``shuffled_prompt``), and, given ``neutral``
    (the conditioning of one neutral prompt, e.g. the empty one), with every prompt replaced by it
    (``neutral_prompt``). A classifier that reads the latent keeps its late-quarter accuracy with
    the neutral prompt and with another row's prompt, and loses it with shuffled latents; one that
    reads only the words does the opposite. ``neutral_prompt`` alone can flatter: a classifier may
    read the latent when the prompt is empty and still side with the words when there are words
    (``shuffled_prompt`` shows it). ``rows`` must carry labels."""
    if rows.labels is None:
        raise ValueError("classifier_ablation needs labelled rows")
    was_training = redirector.training
    redirector.eval()
    device = next(redirector.parameters()).device
    variants = ["real", "shuffled_latent", "shuffled_prompt"] + (
        ["neutral_prompt"] if neutral is not None else []
    )
    correct = {v: torch.zeros(4) for v in variants}
    count = torch.zeros(4)
    permutation = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))
    for i in range(0, len(rows), batch_size):
        index = torch.arange(i, min(len(rows), i + batch_size))
        part = rows.select(index)
        latents, t, cond, labels = part.batch(device, 0.0)
        bucket = timestep_quarter(part.timesteps)
        count.index_add_(0, bucket, torch.ones(len(index)))
        inputs = {
            "real": (latents, t, cond),
            "shuffled_latent": (rows.latents[permutation[index]].to(device), t, cond),
            "shuffled_prompt": (latents, t, rows.cond.rows(permutation[index]).map(lambda x: x.to(device))),
        }
        if neutral is not None:
            b = len(index)
            inputs["neutral_prompt"] = (
                latents,
                t,
                neutral.map(lambda x, b=b: x.to(device).expand(b, *x.shape[1:])),
            )
        for variant, args in inputs.items():
            hit = ((redirector(*args).logit > 0) == (labels > 0.5)).float().cpu()
            correct[variant].index_add_(0, bucket, hit)
    redirector.train(was_training)
    return {
        v: {QUARTERS[q]: round(float(correct[v][q] / count[q]), 4) for q in range(4) if count[q] > 0}
        for v in variants
    }


LATE_QUARTERS = ("t0.00-0.25", "t0.25-0.50")


def selection_score(figures: dict[str, Any]) -> float:
    """What model selection minimises (lower is better): the held-out redirection, mask, scale and
    preservation losses, plus the classifier's held-out *error rate* instead of its BCE, plus, when
    the ablation ran with a neutral prompt, the error rate of the latent alone over the late half of
    the schedule.

    Why not the BCE: trajectory labels are outcomes, and at the noisiest steps an outcome is not yet
    decided, so held-out BCE grows with every step as the classifier becomes confident on the
    training seeds, while its accuracy holds; selecting on it keeps the weights of the first
    evaluation, which read only the prompt. Why the latent term: a classifier worth its name
    decides the late steps from the image being formed (measured on the Shapes star concept: the
    latent-only late accuracy rose from 0.69, always "safe", at step 100 to 0.95 at step 1,000)."""
    score = figures["heldout_total"] - figures["heldout_classification"] + (1.0 - figures["heldout_accuracy"])
    neutral = figures.get("heldout_ablation", {}).get("neutral_prompt")
    if neutral:
        late = [neutral[q] for q in LATE_QUARTERS if q in neutral]
        if late:
            score += 1.0 - sum(late) / len(late)
    return round(float(score), 5)


@torch.no_grad()
def evaluate_redirector(
    redirector: Redirector,
    forget: Trajectories,
    retain: Trajectories,
    *,
    strength: float = 1.0,
    batch_size: int = 256,
    neutral: Conditioning | None = None,
    redirected: Trajectories | None = None,
    blended: Trajectories | None = None,
) -> dict[str, Any]:
    """Held-out figures: losses, classifier accuracy (overall and per timestep quarter) against each
    row's label (its outcome label, or 1 / 0 by side), the redirection cosine to the paired retain
    embedding on the tokens the pair changes, and :func:`classifier_ablation` (``heldout_ablation``).
    ``redirected`` (labelled held-out rows of redirected trajectories) join the classifier's rows,
    and their own accuracy per quarter is ``heldout_redirected_accuracy_by_t``; likewise ``blended``
    (labelled held-out rows of blends, ``TrainConfig.blends``) and ``heldout_blended_accuracy_by_t``."""
    was_training = redirector.training
    redirector.eval()
    device = next(redirector.parameters()).device
    sums: dict[str, float] = {}
    n = len(forget)
    for i in range(0, n, batch_size):
        index = torch.arange(i, min(n, i + batch_size))
        f, r = forget.select(index), retain.select(index)
        losses = redirector_losses(redirector, f.batch(device, 1.0), r.batch(device, 0.0), strength=strength)
        for key, value in losses.items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(index)
    both = Trajectories.concat([forget.labelled(1.0), retain.labelled(0.0)])
    result: dict[str, Any] = {
        f"heldout_{k}": round(v / n, 5) for k, v in sums.items() if k not in ("counterfactual", "classified")
    }
    for name, rows in (("redirected", redirected), ("blended", blended)):
        if rows is not None and len(rows):
            both = Trajectories.concat([both, rows])
            result[f"heldout_{name}_accuracy_by_t"] = classifier_ablation(
                redirector, rows, batch_size=batch_size
            )["real"]
    ablation = classifier_ablation(redirector, both, neutral=neutral, batch_size=batch_size)
    quarters = timestep_quarter(both.timesteps)
    weights = torch.bincount(quarters, minlength=4).float()
    result["heldout_accuracy"] = round(
        float(sum(ablation["real"].get(QUARTERS[q], 0.0) * weights[q] for q in range(4)) / weights.sum()), 5
    )
    result["heldout_ablation"] = ablation
    result["heldout_accuracy_by_t"] = ablation["real"]
    result["heldout_selection"] = selection_score(result)
    if forget.labels is not None:
        result["heldout_unsafe_share"] = round(float((both.labels > 0.5).float().mean()), 4)  # type: ignore[operator]
    redirector.train(was_training)
    return result


def check_shares(
    prompt_dropout: float = 0.0,
    prompt_swap: float = 0.0,
    swap_below: float = 0.5,
    renoise: float = 0.0,
    refine_below: float = 0.5,
    classify_below: float = 1.0,
) -> None:
    """``ValueError`` naming the first of the classifier's training shares outside its range:
    ``prompt_dropout``, ``prompt_swap`` and ``renoise`` in [0, 1], ``swap_below``, ``refine_below``
    and ``classify_below`` (normalised timesteps) in (0, 1]."""
    for name, value, low_open in (
        ("prompt_dropout", prompt_dropout, False),
        ("prompt_swap", prompt_swap, False),
        ("renoise", renoise, False),
        ("swap_below", swap_below, True),
        ("refine_below", refine_below, True),
        ("classify_below", classify_below, True),
    ):
        ok = isinstance(value, int | float) and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)
        if not ok:
            raise ValueError(
                f"{name}: expected a share in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}"
            )


def check_classify_below(classify_below: float, trainable: str) -> None:
    """``ValueError`` unless ``classify_below`` is off (1) or the fit trains the classifier alone."""
    if classify_below < 1.0 and trainable != "classifier":
        raise ValueError(
            f"classify_below {classify_below}: only with trainable 'classifier' (the redirection heads "
            "move the prompt at every step, so they learn from every step)"
        )


def _draws(
    renoiser: Renoiser, n: int, share: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank's noise each of ``n`` rows would get, and which of them are renoised (``share``)."""
    pick = torch.rand(n, generator=generator) < share
    return torch.randint(0, len(renoiser.bank), (n,), generator=generator), pick


def _rows_at_or_below(rows: Trajectories, below: float) -> torch.Tensor:
    """Indices of ``rows`` at a normalised timestep <= ``below`` (all of them at 1)."""
    if below >= 1.0:
        return torch.arange(len(rows))
    return (rows.timesteps <= below).nonzero().squeeze(1)


def fit_redirector(
    redirector: Redirector,
    forget: Trajectories,
    retain: Trajectories,
    *,
    negatives: Trajectories | None = None,
    heldout: tuple[Trajectories, Trajectories] | None = None,
    neutral: Conditioning | None = None,
    redirected: Trajectories | None = None,
    heldout_redirected: Trajectories | None = None,
    blended: Trajectories | None = None,
    heldout_blended: Trajectories | None = None,
    prompt_dropout: float = 0.0,
    prompt_swap: float = 0.0,
    swap_below: float = 0.5,
    renoise: float = 0.0,
    classify_below: float = 1.0,
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
    trainable: str = "all",
) -> FitResult:
    """Train ``redirector`` in place on paired trajectories (row i of ``forget`` and ``retain`` is a
    pair), with an optional unpaired retain pool ``negatives``.

    ``neutral`` (the conditioning of one neutral prompt) is what ``prompt_dropout`` (a share of the
    classification copy's rows) replaces prompts with, and what the held-out ablation uses.
    ``prompt_swap``: the share of pairs, among those at normalised timesteps below ``swap_below``
    (the late half of the schedule by default), also classified with their prompts exchanged (the
    counterfactual term of :func:`redirector_losses`).
    ``renoise``: the share of drawn rows (a pair's two rows together) whose starting noise is replaced
    by another recorded generation's (:class:`~saferedir_sdk.training.renoise.Renoiser`), so the
    classifier cannot learn the training generations' noises by heart.
    ``classify_below`` (with ``trainable`` "classifier"; 1: off): every row drawn, and every held-out
    row evaluated, is at a normalised timestep at or below it, for a classifier a policy asks only
    there (its rules' ``decide_at_t``): its capacity and every batch go to the noise levels where it
    decides, none to the noisiest steps, where an outcome is not yet formed (on the Shapes striped
    concept it did not help: benchmarks/README.md, "Striped's classifier refitted where it decides").
    With ``heldout`` pairs it evaluates every ``eval_every`` steps, keeps the weights with the
    lowest :func:`selection_score` and, if ``patience`` > 0, stops after that many evaluations
    without improvement. ``redirected`` / ``heldout_redirected``: labelled rows of trajectories the
    guard redirected (the ``classified`` term; never renoised), and their held-out
    counterpart for :func:`evaluate_redirector`; ``blended`` / ``heldout_blended`` likewise, for
    labelled rows of blends (``TrainConfig.blends``). The classified-only rows a batch draws come
    from both, at normalised timesteps at or below ``classify_below``. With an ``accelerate.Accelerator`` the model and optimizer are prepared by it
    (several processes: each draws its own batches, gradients are averaged).
    ``trainable``: "all"; "redirection": the modules the unsafe logit reads
    (:meth:`~saferedir_sdk.redirector.Redirector.decision_modules`) stay as they are, so every
    decision of the redirector it starts from is kept and only the delta, mask and scale heads learn;
    "classifier": only :meth:`~saferedir_sdk.redirector.Redirector.classifier_modules` learn (the
    classifier head, and its own latent encoder and timestep MLP where it has them), so every
    direction, mask and scale is kept.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable: expected one of {TRAINABLE}, got {trainable!r}")
    if len(forget) != len(retain):
        raise ValueError(
            f"forget and retain trajectories must pair up row by row: {len(forget)} vs {len(retain)}"
        )
    check_shares(
        prompt_dropout=prompt_dropout,
        prompt_swap=prompt_swap,
        swap_below=swap_below,
        renoise=renoise,
        classify_below=classify_below,
    )
    check_classify_below(classify_below, trainable)
    for name, rows in (
        ("redirected", redirected),
        ("heldout_redirected", heldout_redirected),
        ("blended", blended),
        ("heldout_blended", heldout_blended),
    ):
        if rows is not None and rows.labels is None:
            what = "trajectories the guard redirected" if "redirected" in name else "blends"
            raise ValueError(f"{name}: {what} need outcome labels (record them with a judge)")
    sets = [forget, retain] + ([negatives] if negatives is not None and len(negatives) else [])
    renoiser = Renoiser.from_trajectories(sets) if renoise > 0 else None
    rank = accelerator.process_index if accelerator is not None else 0
    generator = torch.Generator().manual_seed(seed + 1000 * rank)
    base = redirector
    base.train().requires_grad_(True)
    if trainable == "redirection":
        for name in base.decision_modules():
            getattr(base, name).requires_grad_(False)
    elif trainable == "classifier":
        base.requires_grad_(False)
        for name in base.classifier_modules():
            getattr(base, name).requires_grad_(True)
    optimizer = torch.optim.AdamW(
        [p for p in redirector.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4
    )
    if accelerator is not None:
        redirector, optimizer = accelerator.prepare(redirector, optimizer)
    device = next(base.parameters()).device
    result = FitResult(steps=steps, seconds=0.0, renoise=renoiser.summary() if renoiser else {})
    best_loss, best_state, stale = float("inf"), None, 0
    bar = None
    if progress and (accelerator is None or accelerator.is_main_process):
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fit redirector", unit="step", mininterval=2.0)
    start = time.perf_counter()
    rows = _rows_at_or_below(forget, classify_below)  # a pair's two rows share their step
    neg_rows = _rows_at_or_below(negatives, classify_below) if negatives is not None else None
    if classify_below < 1.0 and heldout is not None:
        kept = _rows_at_or_below(heldout[0], classify_below)
        heldout = (heldout[0].select(kept), heldout[1].select(kept))
    if len(rows) == 0 or (heldout is not None and len(heldout[0]) == 0):
        raise ValueError(f"classify_below {classify_below}: no training or held-out row at or below it")
    n = len(rows)
    extra = [r for r in (redirected, blended) if r is not None and len(r)]
    classified = Trajectories.concat(extra) if len(extra) > 1 else (extra[0] if extra else None)
    if classify_below < 1.0:
        classified, heldout_redirected, heldout_blended = (
            None if rows_ is None else rows_.select(_rows_at_or_below(rows_, classify_below))
            for rows_ in (classified, heldout_redirected, heldout_blended)
        )
    for step in range(steps):
        index = rows[torch.randint(0, n, (min(batch_size, n),), generator=generator)]
        f, r = forget.select(index), retain.select(index)
        if renoiser is not None:
            draws = _draws(renoiser, len(index), renoise, generator)
            f, r = renoiser.renoise(0, f, index, *draws), renoiser.renoise(1, r, index, *draws)
        neg = None
        if neg_rows is not None and len(neg_rows):
            assert negatives is not None
            neg_index = neg_rows[
                torch.randint(0, len(neg_rows), (min(batch_size, len(neg_rows)),), generator=generator)
            ]
            neg = negatives.select(neg_index)
            if renoiser is not None:
                neg = renoiser.renoise(
                    2, neg, neg_index, *_draws(renoiser, len(neg_index), renoise, generator)
                )
        moved = None
        if classified is not None and len(classified):
            pick = torch.randint(0, len(classified), (min(batch_size, len(classified)),), generator=generator)
            moved = classified.select(pick).batch(device, 1.0)
        augment = None
        if token_dropout > 0 or embed_noise > 0 or (prompt_dropout > 0 and neutral is not None):

            def augment(b: Batch) -> Batch:
                return _augment(b, token_dropout, embed_noise, generator, prompt_dropout, neutral)

        swap = None
        if prompt_swap > 0:
            swap = (torch.rand(len(index), generator=generator) < prompt_swap) & (f.timesteps < swap_below)
        losses = redirector_losses(
            redirector,
            f.batch(device, 1.0),
            r.batch(device, 0.0),
            negatives=neg.batch(device, 0.0) if neg is not None else None,
            strength=strength,
            augment=augment,
            swap=swap.to(device) if swap is not None else None,
            classified=moved,
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
            figures = evaluate_redirector(
                base,
                *heldout,
                strength=strength,
                neutral=neutral,
                redirected=heldout_redirected,
                blended=heldout_blended,
            )
            if figures["heldout_selection"] < best_loss:
                best_loss, stale = figures["heldout_selection"], 0
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
