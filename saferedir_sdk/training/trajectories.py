"""Recording what the guard will see: (latent view, normalised timestep, conditional conditioning)
at each denoising step of a pipeline's own sampler, through the same adapter the guard uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..adapter import Adapter
from ..atomic import atomic_path
from ..conditioning import Conditioning
from ..engine import EngineState, RedirectionEngine


@dataclass
class Trajectories:
    """N recorded denoising steps (conditional half only).

    Attributes:
        latents: (N, C, H, W) float32 latent views.
        timesteps: (N,) float32 normalised timesteps (0 clean .. 1 noise).
        cond: the conditional conditioning of the N rows (float32).
        steps: (N,) int64 index of the step within its generation.
        prompt_ids: (N,) int64 index into the recorded prompt list.
        seeds: (N,) int64 generator seed of the generation.
        labels: (N,) float32 outcome label of the row's generation (1: its final image shows the
            concept, per the concept's outcome judge; with a soft reading, a value in [0, 1] that is
            above 0.5 where it shows it), or None when nothing judged the images.

    Rows are ordered by (seed, step, prompt), so two recordings of prompt lists of the same length
    with the same seeds and steps line up row by row (forget/retain pairs).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    steps: torch.Tensor
    prompt_ids: torch.Tensor
    seeds: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def select(self, index: torch.Tensor) -> Trajectories:
        return Trajectories(
            self.latents[index],
            self.timesteps[index],
            self.cond.rows(index),
            self.steps[index],
            self.prompt_ids[index],
            self.seeds[index],
            None if self.labels is None else self.labels[index],
        )

    def inputs(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """(latents, timesteps, cond) on ``device``: a redirector's inputs."""
        return self.latents.to(device), self.timesteps.to(device), self.cond.map(lambda t: t.to(device))

    def batch(self, device: torch.device | str, default_label: float) -> tuple[torch.Tensor, ...]:
        """(latents, timesteps, cond, labels) on ``device``; ``default_label`` for every row when the
        trajectories carry no outcome labels (the prompt-side label: 1 forget, 0 retain)."""
        labels = self.labels if self.labels is not None else torch.full((len(self),), float(default_label))
        return (*self.inputs(device), labels.to(device))

    def labelled(self, default_label: float) -> Trajectories:
        """These rows with ``default_label`` for every row when they carry no outcome labels."""
        if self.labels is not None:
            return self
        labels = torch.full((len(self),), float(default_label))
        return Trajectories(
            self.latents, self.timesteps, self.cond, self.steps, self.prompt_ids, self.seeds, labels
        )

    @classmethod
    def concat(cls, parts: Sequence[Trajectories]) -> Trajectories:
        """The rows of ``parts`` one after the other (labels kept only if every part has them)."""
        cond = parts[0].cond
        tokens = tuple(torch.cat([p.cond.tokens[i] for p in parts]) for i in range(len(cond.tokens)))
        pooled = torch.cat([p.cond.pooled for p in parts]) if cond.pooled is not None else None  # type: ignore[misc]
        labels = torch.cat([p.labels for p in parts]) if all(p.labels is not None for p in parts) else None  # type: ignore[misc]
        return cls(
            *(torch.cat([getattr(p, k) for p in parts]) for k in ("latents", "timesteps")),
            Conditioning(tokens, pooled),
            *(torch.cat([getattr(p, k) for p in parts]) for k in ("steps", "prompt_ids", "seeds")),
            labels,
        )

    def save(self, path: str | Path) -> None:
        """Write as safetensors (atomically)."""
        tensors = {
            "latents": self.latents,
            "timesteps": self.timesteps,
            "steps": self.steps,
            "prompt_ids": self.prompt_ids,
            "seeds": self.seeds,
        }
        tensors.update({f"tokens.{i}": t for i, t in enumerate(self.cond.tokens)})
        if self.cond.pooled is not None:
            tensors["pooled"] = self.cond.pooled
        if self.labels is not None:
            tensors["labels"] = self.labels
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))

    @classmethod
    def load(cls, path: str | Path) -> Trajectories:
        data = load_file(str(path))
        tokens = tuple(data[f"tokens.{i}"] for i in range(sum(k.startswith("tokens.") for k in data)))
        return cls(
            data["latents"],
            data["timesteps"],
            Conditioning(tokens, data.get("pooled")),
            data["steps"],
            data["prompt_ids"],
            data["seeds"],
            data.get("labels"),
        )


#: an outcome judge: (N, H, W, 3) uint8 images -> (N,) bool, True where the image shows the concept,
#: or (N,) floats in [0, 1] (a soft reading, :attr:`~saferedir_sdk.concepts.OutcomeJudge.soft`)
Outcome = Callable[[np.ndarray], np.ndarray]


def outcome_labels(verdicts: Any, n: int) -> torch.Tensor:
    """An outcome judge's verdicts on ``n`` images as (n,) float32 labels: bools as 1 / 0, a soft
    reading as it is. ``ValueError`` for another shape or for a value outside [0, 1], NaN included:
    a label that is no number must not train a classifier to call an image safe."""
    labels = torch.as_tensor(np.asarray(verdicts, dtype=np.float32))
    if labels.shape != (n,):
        raise ValueError(f"outcome: expected one verdict per image ({n}), got shape {tuple(labels.shape)}")
    bad = ~((labels >= 0) & (labels <= 1))  # (NaN fails both)
    if bool(bad.any()):
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"outcome: expected verdicts in [0, 1], got {float(labels[i])} for image {i}")
    return labels


@torch.no_grad()
def record_trajectories(
    adapter: Adapter,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] = (0,),
    num_inference_steps: int = 10,
    guidance_scale: float = 7.5,
    outcome: Outcome | None = None,
    engine: RedirectionEngine | None = None,
) -> Trajectories:
    """Run the adapter's pipeline on ``prompts`` once per seed and record every denoising step's
    conditional inputs, as the adapter splits them for the guard. With ``outcome`` the final images
    are judged and every row of a generation gets that generation's label (1: the image shows the
    concept), whatever its prompt said; without it nothing is decoded (``output_type="latent"``).

    With ``engine`` every generation is *redirected* as the guard's second run redirects a sample a
    ``rewind`` rule flagged: each of the engine's concepts stuck from its first check
    (``init_state(cond, flagged)``), its deltas recomputed at the rule's checks. The rows record what
    the guard's checks read on such a trajectory: its latents, and the unredirected conditioning.
    With ``outcome`` each is labelled by whether the redirected image still shows the concept."""
    records: list[tuple[Any, ...]] = []
    box: dict[str, Any] = {"seed": 0, "step": 0, "state": None}
    n = len(prompts)

    def redirected(args: tuple, kwargs: dict[str, Any], inputs: Any) -> tuple[tuple, dict[str, Any]] | None:
        if engine is None:
            return None
        state: EngineState | None = box["state"]
        if inputs.cond is None:  # the unconditional call of a backbone that runs CFG halves apart
            if state is None or inputs.uncond is None:
                return None
            return adapter.merge(
                args, kwargs, replace(inputs, uncond=engine.uncond_only(inputs.uncond, state))
            )
        if state is None:
            flagged = torch.ones(inputs.cond.batch_size, len(engine.concepts), dtype=torch.bool)
            state = box["state"] = engine.init_state(inputs.cond, flagged)
        cond, uncond, _ = engine.step(inputs.latents, inputs.timestep, inputs.cond, state, inputs.uncond)
        return adapter.merge(args, kwargs, replace(inputs, cond=cond, uncond=uncond))

    def hook(_module: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
        inputs = adapter.split(args, kwargs, n)
        if inputs.cond is None:  # the unconditional call of a backbone that runs CFG halves apart
            return redirected(args, kwargs, inputs)
        b = inputs.cond.batch_size
        records.append(
            (
                inputs.latents.float().cpu(),
                inputs.timestep.float().reshape(-1).expand(b).cpu(),
                inputs.cond.map(lambda t: t.float().cpu()),
                torch.full((b,), box["step"], dtype=torch.int64),
                torch.arange(b, dtype=torch.int64),
                torch.full((b,), box["seed"], dtype=torch.int64),
            )
        )
        box["step"] += 1
        return redirected(args, kwargs, inputs)

    judged: list[torch.Tensor] = []
    handle = adapter.denoiser.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for seed in seeds:
            box.update(seed=int(seed), step=0, state=None)
            out = adapter.generate(
                list(prompts),
                seed=int(seed),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                output_type="np" if outcome is not None else "latent",
            )
            if outcome is not None:
                images = (np.asarray(adapter.output_images(out)) * 255).round().astype(np.uint8)
                shows = outcome_labels(outcome(images), len(images))
                judged += [shows] * box["step"]  # the same label for every step of each generation
    finally:
        handle.remove()
    latents, timesteps, conds, steps, ids, seed_col = zip(*records)
    tokens = tuple(torch.cat([c.tokens[i] for c in conds]) for i in range(len(conds[0].tokens)))
    pooled = torch.cat([c.pooled for c in conds]) if conds[0].pooled is not None else None
    return Trajectories(
        torch.cat(latents),
        torch.cat(timesteps),
        Conditioning(tokens, pooled),
        torch.cat(steps),
        torch.cat(ids),
        torch.cat(seed_col),
        torch.cat(judged) if outcome is not None else None,
    )
