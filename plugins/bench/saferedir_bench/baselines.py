"""What a user would pick instead of SafeRedir, implemented so they run on any guarded pipeline.

Used by the efficacy benchmark (``saferedir eval``) to compare methods on the same prompts and seeds.

* :class:`SafeLatentGuidance`: Safe Latent Diffusion's safety guidance (Schramowski et al., CVPR
  2023), equations 3-8 exactly as diffusers' ``StableDiffusionPipelineSafe`` computes them, applied
  through a forward hook on the pipeline's denoiser via its adapter. ``StableDiffusionPipelineSafe``
  itself only exists for SD 1.x components (CLIP + VAE); as a hook the same guidance runs on any
  pipeline with an adapter (``tests/test_baselines.py`` checks it matches
  ``StableDiffusionPipelineSafe`` on an SD pipeline).
* :class:`KeywordBlocklist`: refuse a prompt that contains a listed word (whole-word, case-insensitive).
* :class:`LeaceEmbeddingEraser`: LEACE (Belrose et al. 2023, PyPI ``concept-erasure``) fitted on
  per-token prompt embeddings labelled by concept (one eraser per token stream, and one for the
  pooled embedding), applied to every prompt's conditioning.
* Negative prompts need no code: the pipeline's own ``negative_prompt``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from saferedir_sdk.adapter import Adapter
from saferedir_sdk.conditioning import Conditioning
from saferedir_sdk.errors import SafeRedirError
from saferedir_sdk.optional import require

# diffusers' SafetyConfig presets; warm-up counted in steps of their 50-step schedule
SLD_PRESETS: dict[str, dict[str, float]] = {
    "weak": {
        "guidance_scale": 20,
        "warmup_steps": 15,
        "threshold": 0.0,
        "momentum_scale": 0.0,
        "mom_beta": 0.0,
    },
    "medium": {
        "guidance_scale": 1000,
        "warmup_steps": 10,
        "threshold": 0.01,
        "momentum_scale": 0.3,
        "mom_beta": 0.4,
    },
    "strong": {
        "guidance_scale": 2000,
        "warmup_steps": 7,
        "threshold": 0.025,
        "momentum_scale": 0.5,
        "mom_beta": 0.7,
    },
    "max": {
        "guidance_scale": 5000,
        "warmup_steps": 0,
        "threshold": 1.0,
        "momentum_scale": 0.5,
        "mom_beta": 0.7,
    },
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
    """SLD safety guidance as a denoiser hook, through the backbone's adapter.

    The pipeline combines ``u + g * (c - u)``; SLD wants ``u + g * ((c - u) - n_s)`` with the safety
    term ``n_s`` of equations 4-8. The hook runs the denoiser once more on the conditional rows with
    the safety concept's conditioning (:meth:`Adapter.run_denoiser`) and returns ``c - n_s`` as the
    conditional prediction, so the pipeline's own combination yields SLD's. Without classifier-free
    guidance SLD is off (as in diffusers).

    Use ``with sld.active(adapter, batch_size=B): adapter.generate(B prompts ...)``: the momentum and
    the step count start fresh with every ``with`` block, so run one pipeline call per block.
    """

    def __init__(self, concept: Conditioning, config: SLDConfig | None = None):
        if concept.batch_size != 1:
            raise SafeRedirError(
                f"concept: expected the conditioning of one safety concept, got a batch of {concept.batch_size}"
            )
        self.concept = concept
        self.config = config or SLDConfig()
        self._step = 0
        self._momentum: torch.Tensor | None = None
        self._inside = False

    @contextmanager
    def active(self, adapter: Adapter, batch_size: int) -> Iterator[None]:
        """Guide the pipeline call (of ``batch_size`` images) made inside the block."""
        self._step, self._momentum = 0, None

        def hook(module: Any, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            if self._inside:
                return None
            inputs = adapter.split(args, kwargs, batch_size)
            uncond, cond = adapter.split_output(output, inputs)
            if uncond is None or cond is None:
                return None
            half = cond.shape[0]
            safety_cond = self.concept.map(lambda t: t.to(cond.device).expand(half, *t.shape[1:]))
            self._inside = True
            try:
                safety = adapter.run_denoiser(args, kwargs, inputs, safety_cond)
            finally:
                self._inside = False
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
            return adapter.merge_output(
                output, uncond, cond - guidance
            )  # eq. 3 through the pipeline's own CFG

        handle = adapter.denoiser.register_forward_hook(hook, with_kwargs=True)
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
        self._pattern = re.compile(
            r"(?<![\w-])(" + "|".join(re.escape(w) for w in self.words) + r")(?![\w-])", re.IGNORECASE
        )

    def blocks(self, prompt: str) -> bool:
        return self._pattern.search(prompt) is not None


class LeaceEmbeddingEraser:
    """LEACE on per-token prompt embeddings: fitted so that no linear probe on a single token's
    embedding can tell a concept prompt from a benign one, then applied to every token of every
    prompt: one eraser per token stream (and one for the pooled embedding, if any). Needs the
    optional ``concept-erasure`` package (``pip install 'saferedir-bench[leace]'``)."""

    def __init__(self, erasers: list[Any], pooled: Any = None):
        self.erasers = erasers
        self.pooled = pooled

    @staticmethod
    def _fit_one(
        concept: torch.Tensor,
        benign: torch.Tensor,
        concept_mask: torch.Tensor | None,
        benign_mask: torch.Tensor | None,
    ) -> Any:
        from concept_erasure import LeaceEraser

        xs, zs = [], []
        for embeds, mask, label in ((concept, concept_mask, 1.0), (benign, benign_mask, 0.0)):
            flat = embeds.reshape(-1, embeds.shape[-1]).double()
            if mask is not None:
                flat = flat[mask.reshape(-1).bool()]
            xs.append(flat)
            zs.append(torch.full((flat.shape[0],), label, dtype=torch.float64))
        return LeaceEraser.fit(torch.cat(xs), torch.cat(zs))

    @classmethod
    def fit(
        cls,
        concept: Conditioning,
        benign: Conditioning,
        concept_mask: torch.Tensor | None = None,
        benign_mask: torch.Tensor | None = None,
    ) -> LeaceEmbeddingEraser:
        """``concept``/``benign``: the conditioning of concept and benign prompts; ``*_mask``:
        (N, sum of the streams' T) which tokens are real (default all)."""
        require(
            "concept_erasure", extra="leace", feature="the LEACE baseline", distribution="saferedir-bench"
        )
        erasers, offset = [], 0
        for c, b in zip(concept.tokens, benign.tokens):
            t = c.shape[1]
            cm = concept_mask[:, offset : offset + t] if concept_mask is not None else None
            bm = benign_mask[:, offset : offset + t] if benign_mask is not None else None
            offset += t
            erasers.append(cls._fit_one(c, b, cm, bm))
        pooled = None
        if concept.pooled is not None and benign.pooled is not None:
            pooled = cls._fit_one(concept.pooled, benign.pooled, None, None)
        return cls(erasers, pooled)

    def __call__(self, cond: Conditioning) -> Conditioning:
        tokens = tuple(e(t.double()).to(t.dtype) for e, t in zip(self.erasers, cond.tokens))
        pooled = cond.pooled
        if pooled is not None and self.pooled is not None:
            pooled = self.pooled(pooled.double()).to(pooled.dtype)
        return Conditioning(tokens, pooled)
