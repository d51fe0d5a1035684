"""Stable Diffusion 1.x/2.x adapter: ``StableDiffusionPipeline`` and every pipeline shaped like it
(img2img, inpaint, ControlNet, and the project's Shapes pipeline): a ``unet`` conditioned on one
text encoder's per-token states, classifier-free guidance batched as ``[negative; positive]``.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from PIL import Image

from saferedir_sdk import hookimpl
from saferedir_sdk.adapter import Adapter, CallInfo, DenoiserInputs
from saferedir_sdk.errors import TensorShapeError
from saferedir_sdk.fingerprint import BackboneFingerprint, module_sha256, vocab_sha256

_UNET_ARGS = ("sample", "timestep", "encoder_hidden_states")


def _get(args: tuple, kwargs: dict[str, Any], name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = _UNET_ARGS.index(name)
    if index < len(args):
        return args[index]
    raise TypeError(f"denoiser call without '{name}'")


def _call_signature(pipe: Any) -> inspect.Signature:
    """Signature of the pipeline's own ``__call__`` (not the guard's ``*args, **kwargs`` wrapper)."""
    for cls in type(pipe).__mro__:
        fn = cls.__dict__.get("__call__")
        if fn is not None and "prompt" in inspect.signature(fn).parameters:
            return inspect.signature(fn)
    raise TypeError(f"{type(pipe).__name__}.__call__ has no 'prompt' parameter")


class StableDiffusionAdapter(Adapter):
    """Guards SD 1.x-style pipelines through a forward pre-hook on ``pipe.unet``."""

    name = "sd1"

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return pipe.unet

    def latent_channels(self, pipe: Any) -> int:
        vae = getattr(pipe, "vae", None)
        if vae is not None and hasattr(vae.config, "latent_channels"):
            return int(vae.config.latent_channels)
        return int(pipe.unet.config.in_channels)

    def fingerprint(self, pipe: Any) -> BackboneFingerprint:
        return BackboneFingerprint(
            token_dim=int(pipe.text_encoder.config.hidden_size),
            seq_len=int(pipe.tokenizer.model_max_length),
            latent_channels=self.latent_channels(pipe),
            tokenizer_sha256=vocab_sha256(pipe.tokenizer.get_vocab()),
            text_encoder_sha256=module_sha256(pipe.text_encoder),
            family=self.name,
        )

    def call_info(self, pipe: Any, args: tuple, kwargs: dict[str, Any]) -> CallInfo:
        bound = _call_signature(pipe).bind_partial(pipe, *args, **kwargs).arguments
        prompt = bound.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        return CallInfo(
            prompts=prompts,
            num_images_per_prompt=int(bound.get("num_images_per_prompt") or 1),
            output_type=str(bound.get("output_type") or "pil"),
        )

    def split_denoiser_inputs(self, pipe: Any, args: tuple, kwargs: dict[str, Any]) -> DenoiserInputs:
        sample = _get(args, kwargs, "sample")
        timestep = _get(args, kwargs, "timestep")
        embeds = _get(args, kwargs, "encoder_hidden_states")
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=sample.device)
        if embeds.ndim != 3 or embeds.shape[0] != sample.shape[0]:
            raise TensorShapeError("encoder_hidden_states", f"({sample.shape[0]}, T, D)", tuple(embeds.shape))
        latents = sample[:, : self.latent_channels(pipe)]
        if not getattr(pipe, "do_classifier_free_guidance", False):
            return DenoiserInputs(latents=latents, timestep=timestep, cond=embeds, uncond=None)
        if embeds.shape[0] % 2:
            raise TensorShapeError("encoder_hidden_states", "an even batch [negative; positive] under CFG", tuple(embeds.shape))
        half = embeds.shape[0] // 2
        if timestep.ndim == 1 and timestep.shape[0] == 2 * half:
            timestep = timestep[half:]
        return DenoiserInputs(latents=latents[half:], timestep=timestep, cond=embeds[half:], uncond=embeds[:half])

    def merge_denoiser_inputs(
        self, pipe: Any, args: tuple, kwargs: dict[str, Any], cond: torch.Tensor, uncond: torch.Tensor | None
    ) -> tuple[tuple, dict[str, Any]]:
        embeds = cond if uncond is None else torch.cat([uncond, cond], dim=0)
        if "encoder_hidden_states" in kwargs or len(args) < 3:
            return args, {**kwargs, "encoder_hidden_states": embeds}
        return (*args[:2], embeds, *args[3:]), kwargs

    def replace_samples(
        self, pipe: Any, output: Any, indices: list[int], color: tuple[int, int, int], info: CallInfo
    ) -> Any:
        images = output[0] if isinstance(output, tuple) else output.images
        images = _replace(images, indices, color, latent=info.output_type == "latent")
        if isinstance(output, tuple):
            return (images, *output[1:])
        output.images = images
        return output


def _replace(images: Any, indices: list[int], color: tuple[int, int, int], *, latent: bool) -> Any:
    if isinstance(images, list):
        images = list(images)
        for i in indices:
            images[i] = Image.new(images[i].mode if images[i].mode in ("RGB", "RGBA") else "RGB", images[i].size, color)
        return images
    if isinstance(images, np.ndarray):
        images = images.copy()
        images[indices] = 0.0 if latent else np.asarray(color, dtype=images.dtype) / 255.0
        return images
    if isinstance(images, torch.Tensor):
        images = images.clone()
        if latent:
            images[indices] = 0.0
        else:  # (N, 3, H, W) in [0, 1]
            images[indices] = torch.tensor(color, dtype=images.dtype, device=images.device).view(1, -1, 1, 1) / 255.0
        return images
    raise TypeError(f"cannot place a placeholder into pipeline output of type {type(images).__name__}")


def is_sd_like(pipeline: Any) -> bool:
    """A pipeline with one text encoder, a tokenizer and a UNet2DConditionModel without SDXL's
    added text-time conditioning."""
    from diffusers import UNet2DConditionModel

    unet = getattr(pipeline, "unet", None)
    return (
        isinstance(unet, UNet2DConditionModel)
        and getattr(pipeline, "text_encoder", None) is not None
        and getattr(pipeline, "tokenizer", None) is not None
        and getattr(pipeline, "text_encoder_2", None) is None
        and unet.config.addition_embed_type is None
    )


@hookimpl
def saferedir_make_adapter(pipeline: Any) -> Adapter | None:
    return StableDiffusionAdapter() if is_sd_like(pipeline) else None
