"""Fresh starting noise for recorded trajectories, so a latent classifier learns what the image is
becoming rather than which generation it is looking at.

Every row of a recorded generation shares that generation's starting noise, and a deterministic
sampler's latent at step ``s`` is very nearly a fixed mix of the generation's last recorded latent
and that noise: ``z_s ~ a_s * z_last + b_s * z_first``. The two coefficients per step are fitted by
least squares over the recorded generations (on the Shapes backbone, R^2 >= 0.993 at every one of
its 20 steps; ``a_s`` and ``b_s`` follow the scheduler's signal and noise scales). A classifier fitted
on a few hundred generations can learn each starting noise's label by heart (measured on the Shapes
star concept, latent-only classifier: training accuracy 0.96 over all timesteps, the noisiest
included, held-out BCE 1.77); a fresh noise per draw leaves it only the image to learn from.

:class:`Renoiser` replaces a row's starting-noise component by another generation's starting noise:
``z' = z_s + b_s * (z_first[other] - z_first[own])``. What the row's own trajectory added beyond
the two components (the residual) is kept. A row whose generation lacks a recorded first or last
step is left as it is (``b = 0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .trajectories import Trajectories


def _generation_rows(traj: Trajectories, step: int) -> torch.Tensor:
    """(N,) the row index of each row's generation (seed, prompt) at ``step``, -1 where unrecorded."""
    width = int(traj.prompt_ids.max()) + 1 if len(traj) else 1
    seeds = torch.unique(traj.seeds, return_inverse=True)[1]
    key = seeds * width + traj.prompt_ids
    table = torch.full((int(key.max()) + 1 if len(traj) else 1,), -1, dtype=torch.int64)
    at = (traj.steps == step).nonzero().squeeze(1)
    table[key[at]] = at
    return table[key]


@dataclass
class Renoiser:
    """Draws fresh starting noise for the rows of K trajectory sets (see the module docstring).

    Attributes:
        first: per set, (N,) row index of each row's generation's first step (-1: none recorded).
        scale: per set, (N,) the starting noise's coefficient ``b_s`` at the row's step (0: left as is).
        bank: (G, C, H, W) the starting noises of every recorded generation of every set.
        fit: per step, (a_s, b_s, R^2) of the least-squares fit.
        latents: per set, its (N, C, H, W) latents (each row's own starting noise is read there).
    """

    first: list[torch.Tensor]
    scale: list[torch.Tensor]
    bank: torch.Tensor
    fit: dict[int, tuple[float, float, float]]
    latents: list[torch.Tensor]

    @classmethod
    def from_trajectories(cls, parts: Sequence[Trajectories]) -> Renoiser:
        """Fit ``a_s, b_s`` per step over every generation of ``parts`` (one sampler setting)."""
        last_step = max(int(p.steps.max()) for p in parts if len(p))
        firsts, lasts = (
            [_generation_rows(p, 0) for p in parts],
            [_generation_rows(p, last_step) for p in parts],
        )
        moments: dict[int, torch.Tensor] = {}  # step -> sums of z.x, z.e, x.x, x.e, e.e, z.z and z's sum
        counts: dict[int, int] = {}
        for p, first, last in zip(parts, firsts, lasts):
            ok = (first >= 0) & (last >= 0)
            for step in p.steps[ok].unique().tolist():
                rows = (ok & (p.steps == step)).nonzero().squeeze(1)
                z, x, e = (p.latents[i].flatten(1).double() for i in (rows, last[rows], first[rows]))
                sums = torch.stack(
                    [
                        (z * x).sum(),
                        (z * e).sum(),
                        (x * x).sum(),
                        (x * e).sum(),
                        (e * e).sum(),
                        (z * z).sum(),
                        z.sum(),
                    ]
                )
                moments[step] = moments.get(step, torch.zeros(7, dtype=torch.float64)) + sums
                counts[step] = counts.get(step, 0) + z.numel()
        fit: dict[int, tuple[float, float, float]] = {}
        for step, (zx, ze, xx, xe, ee, zz, zs) in sorted(moments.items()):
            gram = torch.tensor([[xx, xe], [xe, ee]], dtype=torch.float64)
            a, b = torch.linalg.lstsq(gram, torch.tensor([zx, ze], dtype=torch.float64)).solution.tolist()
            residual = zz - 2 * (a * zx + b * ze) + a * a * xx + 2 * a * b * xe + b * b * ee
            variance = zz - zs * zs / counts[step]
            fit[step] = (round(a, 4), round(b, 4), round(float(1 - residual / variance), 4))
        b_of = torch.zeros(last_step + 1)  # per step, the starting noise's coefficient
        for step, (_, b, _) in fit.items():
            b_of[step] = b
        scales = [
            torch.where((first >= 0) & (last >= 0), b_of[p.steps], torch.zeros(()))
            for p, first, last in zip(parts, firsts, lasts)
        ]
        bank = torch.cat([p.latents[p.steps == 0] for p in parts])
        return cls(firsts, scales, bank, fit, [p.latents for p in parts])

    def renoise(
        self, part: int, rows: Trajectories, index: torch.Tensor, draw: torch.Tensor, pick: torch.Tensor
    ) -> Trajectories:
        """``rows`` (the rows ``index`` of set ``part``) with the starting noise of the rows ``pick``
        (bool) replaced by the bank's noises ``draw``."""
        first = self.first[part][index]
        own = torch.where(
            (first >= 0).reshape(-1, 1, 1, 1), self.latents[part][first.clamp_min(0)], torch.zeros(())
        )
        b = (self.scale[part][index] * pick).reshape(-1, 1, 1, 1)
        return replace(rows, latents=rows.latents + b * (self.bank[draw] - own))

    def summary(self) -> dict[str, float]:
        """The fit's worst R^2 over the steps and the number of starting noises drawn from."""
        return {"min_r2": min(r2 for _, _, r2 in self.fit.values()), "noises": len(self.bank)}
