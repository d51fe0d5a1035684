"""Recording what the guard will see: (latent, timestep, conditional embeddings) at each denoiser
call of a pipeline's own sampler, through the same adapter and hook the guard uses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pluggy
import torch

from ..plugins import default_plugin_manager, find_adapter


@dataclass
class Trajectories:
    """N recorded denoiser calls (conditional half only).

    Attributes:
        latents: (N, C, H, W) float32.
        timesteps: (N,) float32.
        embeds: (N, T, D) float32 conditional prompt embeddings.
        steps: (N,) int64 index of the denoiser call within its generation.
        prompt_ids: (N,) int64 index into the recorded prompt list.
        seeds: (N,) int64 generator seed of the generation.

    Rows are ordered by (seed, step, prompt), so two recordings of prompt lists of the same length
    with the same seeds and steps line up row by row (forget/retain pairs).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    embeds: torch.Tensor
    steps: torch.Tensor
    prompt_ids: torch.Tensor
    seeds: torch.Tensor

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index: torch.Tensor) -> Trajectories:
        return Trajectories(*(t[index] for t in self.as_tuple()))

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return (self.latents, self.timesteps, self.embeds, self.steps, self.prompt_ids, self.seeds)


@torch.no_grad()
def record_trajectories(
    pipe: Any,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] = (0,),
    num_inference_steps: int = 10,
    guidance_scale: float = 7.5,
    plugin_manager: pluggy.PluginManager | None = None,
    **call_kwargs: Any,
) -> Trajectories:
    """Run ``pipe`` on ``prompts`` once per seed (``output_type="latent"``) and record every
    denoiser call's conditional inputs."""
    adapter = find_adapter(plugin_manager or default_plugin_manager(), pipe)
    records: list[tuple[torch.Tensor, ...]] = []
    seed_box = {"seed": 0, "step": 0}

    def hook(_module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        inputs = adapter.split_denoiser_inputs(pipe, args, kwargs)
        n = inputs.cond.shape[0]
        t = inputs.timestep.float().reshape(-1).expand(n) if inputs.timestep.ndim else inputs.timestep.float().repeat(n)
        records.append(
            (
                inputs.latents.float().cpu(),
                t.cpu(),
                inputs.cond.float().cpu(),
                torch.full((n,), seed_box["step"], dtype=torch.int64),
                torch.arange(n, dtype=torch.int64),
                torch.full((n,), seed_box["seed"], dtype=torch.int64),
            )
        )
        seed_box["step"] += 1

    handle = adapter.denoiser(pipe).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for seed in seeds:
            seed_box.update(seed=int(seed), step=0)
            pipe(
                list(prompts),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(int(seed)),
                output_type="latent",
                **call_kwargs,
            )
    finally:
        handle.remove()
    columns = list(zip(*records))
    return Trajectories(*(torch.cat(col) for col in columns))
