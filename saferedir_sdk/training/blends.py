"""Blends: generations on the boundary between a concept and what is not, made from recorded pairs.

A forget generation and a retain-side generation that started from the same noise (a pair's two
rows, or a forget row and the pool's row recorded at the same position with the same seed) are two
paths of one deterministic sampler from one point. For a sampler whose step is linear in the latent
and the model's output (DDIM, Euler, the DPM-Solver family), the mix ``(1 - w) * z_f + w * z_r`` of
the two paths, step by step, is itself the path that the same mix of the model's outputs would have
taken; its last recorded latent (the input of the sampler's last step, nearly clean) decodes to an
image in between the two (a red square mixed with its pair, the same square in purple: a magenta
square), and the outcome judge says which side it ends on.

These are the images a concept's classifier meets when a prompt describes the concept without
naming it ("the colour of a valentine heart"): off the palette of the training prompts, where the
judge's boundary lies.

The rows are classified only (``fit_redirector``'s ``blended``): the classifier learns where the
judge's boundary runs in the latent; no redirection is learnt from them. Their conditioning is the
same mix of the two rows' conditioning.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from .trajectories import Trajectories, outcome_labels


def _generations(traj: Trajectories) -> dict[tuple[int, int], torch.Tensor]:
    """(seed, prompt id) -> the row indices of that generation, ordered by step."""
    if not len(traj):
        return {}
    keys = traj.seeds * (int(traj.prompt_ids.max()) + 1) + traj.prompt_ids
    order = torch.argsort(keys * (int(traj.steps.max()) + 1) + traj.steps)
    counts = torch.unique_consecutive(keys[order], return_counts=True)[1]
    return {
        (int(traj.seeds[rows[0]]), int(traj.prompt_ids[rows[0]])): rows
        for rows in torch.split(order, counts.tolist())
    }


def blend_trajectories(
    forget: Trajectories,
    partners: Sequence[Trajectories],
    *,
    per_generation: int,
    weights: tuple[float, float],
    decode: Callable[[torch.Tensor], np.ndarray],
    outcome: Callable[[np.ndarray], np.ndarray],
    seed: int = 0,
    batch_size: int = 256,
) -> Trajectories:
    """``per_generation`` blends of every generation of ``forget`` with a generation of
    ``partners`` (drawn at random) that recorded the same steps and started from the same noise
    (equal first latents, same seed and position); the partner's weight ``w`` drawn uniformly from
    ``weights``. Each blend's rows are the two generations' rows mixed step by step (latents and
    conditioning), labelled by ``outcome`` on ``decode`` of its last recorded latent. A generation without
    such a partner gets no blend; none at all is a ``ValueError`` (the recordings do not line up).

    ``decode``: (N, C, H, W) last latent views -> (N, H, W, 3) uint8 images
    (:meth:`~saferedir_sdk.adapter.Adapter.decode_latents`)."""
    low, high = weights
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"weights: expected (low, high) with 0 <= low <= high <= 1, got {weights!r}")
    if per_generation < 1:
        raise ValueError(f"per_generation: expected a whole number >= 1, got {per_generation!r}")
    own = _generations(forget)
    theirs = [(part, _generations(part)) for part in partners]
    rng = random.Random(seed)
    plan: list[tuple[torch.Tensor, Trajectories, torch.Tensor, float]] = []
    for key, rows in own.items():
        found = []
        for part, gens in theirs:
            other = gens.get(key)
            if (
                other is not None
                and torch.equal(part.steps[other], forget.steps[rows])
                and torch.equal(part.latents[other[0]], forget.latents[rows[0]])
            ):
                found.append((part, other))
        for _ in range(per_generation if found else 0):
            part, other = rng.choice(found)
            plan.append((rows, part, other, rng.uniform(low, high)))
    if not plan:
        raise ValueError(
            "blends: no forget generation has a partner that started from the same noise (same seed, "
            "same position, equal first latents): record forget and retain-side prompts with the "
            "same seeds, in lists whose rows line up"
        )
    blends: list[Trajectories] = []
    for i in range(0, len(plan), batch_size):
        chunk = plan[i : i + batch_size]
        mixed = []
        for b, (rows, part, other, w) in enumerate(chunk, start=i):
            mine, yours = forget.select(rows), part.select(other)
            mixed.append(
                Trajectories(
                    (1 - w) * mine.latents + w * yours.latents,
                    mine.timesteps,
                    mine.cond.zip_with(yours.cond, lambda a, c, w=w: (1 - w) * a + w * c),
                    mine.steps,
                    torch.full((len(rows),), b, dtype=torch.int64),  # each blend its own generation
                    mine.seeds,
                )
            )
        shows = outcome_labels(outcome(decode(torch.stack([m.latents[-1] for m in mixed]))), len(chunk))
        for m, verdict in zip(mixed, shows.tolist()):
            m.labels = torch.full((len(m),), verdict)
            blends.append(m)
    return Trajectories.concat(blends)
