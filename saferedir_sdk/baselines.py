"""What a user would pick instead of SafeRedir, implemented so they run on any guarded pipeline.

Used by the efficacy benchmark (``saferedir eval``) to compare methods on the same prompts and seeds.

* :class:`SafeLatentGuidance`: Safe Latent Diffusion's safety guidance (Schramowski et al., CVPR
  2023), equations 3-8 exactly as diffusers' ``StableDiffusionPipelineSafe`` computes them, applied
  through a forward hook on the pipeline's denoiser. ``StableDiffusionPipelineSafe`` itself only
  exists for SD 1.x components (CLIP + VAE); as a hook the same guidance runs on any pipeline the
  SDK has an adapter for (``tests/test_baselines.py`` checks it matches ``StableDiffusionPipelineSafe``
  on an SD pipeline).
* :class:`KeywordBlocklist`: refuse a prompt that contains a listed word (whole-word, case-insensitive).
* :class:`LeaceEmbeddingEraser`: LEACE (Belrose et al. 2023, PyPI ``concept-erasure``) fitted on
  per-token prompt embeddings labelled by concept, applied to every prompt's embeddings.
* Negative prompts need no code: the pipeline's own ``negative_prompt``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .adapter import Adapter
from .errors import SafeRedirError
from .plugins import default_plugin_manager, find_adapter

# diffusers' SafetyConfig presets; warm-up counted in steps of their 50-step schedule
SLD_PRESETS: dict[str, dict[str, float]] = {
    "weak": {"guidance_scale": 20, "warmup_steps": 15, "threshold": 0.0, "momentum_scale": 0.0, "mom_beta": 0.0},
    "medium": {"guidance_scale": 1000, "warmup_steps": 10, "threshold": 0.01, "momentum_scale": 0.3, "mom_beta": 0.4},
    "strong": {"guidance_scale": 2000, "warmup_steps": 7, "threshold": 0.025, "momentum_scale": 0.5, "mom_beta": 0.7},
    "max": {"guidance_scale": 5000, "warmup_steps": 0, "threshold": 1.0, "momentum_scale": 0.5, "mom_beta": 0.7},
}


@dataclass
class SLDConfig:
    guidance_scale: float = 1000.0
    warmup_steps: int = 10
    threshold: float = 0.01
    momentum_scale: float = 0.3
    mom_beta: float = 0.4

    @classmethod
    def preset(cls, name: str, num_inference_steps: int = 50) -> SLDConfig:
        """A diffusers preset, its warm-up rescaled from 50 steps to ``num_inference_steps``."""
        if name not in SLD_PRESETS:
            raise SafeRedirError(f"unknown SLD preset {name!r}; expected one of {sorted(SLD_PRESETS)}")
        p = dict(SLD_PRESETS[name])
        p["warmup_steps"] = int(round(p["warmup_steps"] * num_inference_steps / 50))
        return cls(**p)


class SafeLatentGuidance:
    """SLD safety guidance as a denoiser hook.

    The pipeline combines ``u + g * (c - u)``; SLD wants ``u + g * ((c - u) - n_s)`` with the safety
    term ``n_s`` of equations 4-8. The hook runs the denoiser once more on the safety concept's
    embeddings and returns ``c - n_s`` as the conditional half, so the pipeline's own combination
    yields SLD's. Without classifier-free guidance SLD is off (as in diffusers).

    Use ``with sld.active(pipe): pipe(...)``. The momentum and the step count start fresh with every
    pipeline call (each call gives the scheduler a new schedule tensor).
    """

    def __init__(self, concept_embeds: torch.Tensor, config: SLDConfig | None = None, adapter: Adapter | None = None):
        if concept_embeds.ndim != 3 or concept_embeds.shape[0] != 1:
            raise SafeRedirError(f"concept_embeds: expected (1, T, D), got {tuple(concept_embeds.shape)}")
        self.concept_embeds = concept_embeds
        self.config = config or SLDConfig()
        self.adapter = adapter
        self._step = 0
        self._momentum: torch.Tensor | None = None
        self._schedule: Any = None
        self._inside = False

    @contextmanager
    def active(self, pipe: Any) -> Iterator[None]:
        adapter = self.adapter or find_adapter(default_plugin_manager(), pipe)
        denoiser = adapter.denoiser(pipe)
        self._step, self._momentum, self._schedule = 0, None, None

        def hook(module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            if self._inside:
                return None
            split = adapter.split_denoiser_inputs(pipe, args, kwargs)
            if split.uncond is None:
                return None
            # a new pipeline call starts fresh: every call sets a new schedule tensor on the
            # scheduler (an identity check on the host, never a read of the device timestep)
            half = split.cond.shape[0]
            schedule = getattr(pipe.scheduler, "timesteps", None)
            if schedule is not self._schedule:
                self._step, self._momentum, self._schedule = 0, None, schedule
            pred = output[0] if isinstance(output, tuple) else output.sample
            uncond, cond = pred[:half], pred[half:]
            safety_embeds = self.concept_embeds.to(split.cond.device, split.cond.dtype).expand(half, -1, -1)
            sample = args[0] if args else kwargs["sample"]
            rest = {k: v for k, v in kwargs.items() if k not in ("sample", "timestep", "encoder_hidden_states")}
            self._inside = True
            try:  # SD-style call: denoiser(sample, timestep, encoder_hidden_states=..., **rest)
                s_out = module(sample[half:], split.timestep, encoder_hidden_states=safety_embeds, **rest)
            finally:
                self._inside = False
            safety = s_out[0] if isinstance(s_out, tuple) else s_out.sample
            cfg = self.config
            if self._momentum is None:
                self._momentum = torch.zeros_like(cond)
            scale = torch.clamp((cond - safety).abs() * cfg.guidance_scale, max=1.0)  # eq. 6
            scale = torch.where((cond - safety) >= cfg.threshold, torch.zeros_like(scale), scale)  # eq. 6
            guidance = (safety - uncond) * scale  # eq. 4
            guidance = guidance + cfg.momentum_scale * self._momentum  # eq. 7
            self._momentum = cfg.mom_beta * self._momentum + (1 - cfg.mom_beta) * guidance  # eq. 8
            step, self._step = self._step, self._step + 1
            if step < cfg.warmup_steps:
                return None
            new = torch.cat([uncond, cond - guidance])  # eq. 3 through the pipeline's own CFG
            if isinstance(output, tuple):
                return (new, *output[1:])
            output.sample = new
            return output

        handle = denoiser.register_forward_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()


class KeywordBlocklist:
    """Refuses prompts containing any listed word or phrase (whole words, case-insensitive)."""

    def __init__(self, words: Iterable[str]):
        self.words = sorted({w.lower().strip() for w in words if w.strip()})
        if not self.words:
            raise SafeRedirError("KeywordBlocklist: no words given")
        self._pattern = re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in self.words) + r")(?![\w-])", re.IGNORECASE)

    def blocks(self, prompt: str) -> bool:
        return self._pattern.search(prompt) is not None


class LeaceEmbeddingEraser:
    """LEACE on per-token prompt embeddings: fitted so that no linear probe on a single token's
    embedding can tell a concept prompt from a benign one, then applied to every token of every
    prompt. Needs the optional ``concept-erasure`` package (benchmark extra)."""

    def __init__(self, eraser: Any):
        self.eraser = eraser

    @classmethod
    def fit(cls, concept_embeds: torch.Tensor, benign_embeds: torch.Tensor,
            concept_mask: torch.Tensor | None = None, benign_mask: torch.Tensor | None = None) -> LeaceEmbeddingEraser:
        """``*_embeds``: (N, T, D) prompt embeddings; ``*_mask``: (N, T) which tokens are real (default all)."""
        try:
            from concept_erasure import LeaceEraser
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise SafeRedirError("LEACE needs the 'concept-erasure' package: pip install 'saferedir-sdk[bench]'") from exc
        xs, zs = [], []
        for embeds, mask, label in ((concept_embeds, concept_mask, 1.0), (benign_embeds, benign_mask, 0.0)):
            flat = embeds.reshape(-1, embeds.shape[-1]).double()
            if mask is not None:
                flat = flat[mask.reshape(-1).bool()]
            xs.append(flat)
            zs.append(torch.full((flat.shape[0],), label, dtype=torch.float64))
        return cls(LeaceEraser.fit(torch.cat(xs), torch.cat(zs)))

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.eraser(embeds.double()).to(embeds.dtype)
