"""Stable Diffusion 1.x/2.x adapter: ``StableDiffusionPipeline`` and every pipeline shaped like it
(img2img, inpaint, ControlNet, and the project's Shapes pipeline): a ``unet`` conditioned on one
text encoder's per-token states, classifier-free guidance batched as ``[negative; positive]``.

How a UNet call maps onto the contract (``unet(sample, timestep, encoder_hidden_states, **rest)``):

==========================  ==================================================================
``sample`` (2B or B, C', H, W)  latent view: the first ``latent_channels`` channels (an inpainting
                                UNet's 9-channel input gives the 4 latent ones), conditional rows
``timestep`` () or (2B,)        normalised: ``t / scheduler.config.num_train_timesteps``
``encoder_hidden_states``       one token stream ``"text_encoder"``: rows ``[:B]`` uncond,
                                ``[B:]`` cond when the batch is twice the call's batch size;
                                a PAG pipeline's thrice: ``[B:2B]`` cond, ``[2B:]`` the same
                                cond again (perturbed self-attention), put back redirected too
``**rest``                      untouched (ControlNet residuals, cross-attention kwargs, ...),
                                but for the conditioning beside the prompt below
==========================  ==================================================================

Conditioning beside the prompt (:meth:`StableDiffusionAdapter.side_conditioning`), withheld (zeros,
what the pipelines themselves feed as its absence) from the rows of every sample whose prompt the
guard moves: ``added_cond_kwargs["image_embeds"]`` (IP-Adapter image prompts, SD and SDXL),
``cross_attention_kwargs["gligen"]`` (GLIGEN's grounding phrases, boxes and images; zero masks turn
grounding off) and ``class_labels`` where the UNet embeds them by projection (unCLIP's image
embedding of the prompt; the x4 upscaler's noise level is left alone).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from PIL import Image

from saferedir_sdk import hookimpl
from saferedir_sdk.adapter import Adapter, CallInfo, DenoiserInputs
from saferedir_sdk.conditioning import Conditioning, TokenStream
from saferedir_sdk.errors import TensorShapeError
from saferedir_sdk.fingerprint import (
    BackboneFingerprint,
    TextEncoderPrint,
    module_sha256,
    unwrap_compiled,
    vocab_sha256,
)

_UNET_ARGS = ("sample", "timestep", "encoder_hidden_states")
STREAM = "text_encoder"


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


def real_tokens(tokenizer: Any, prompts: list[str]) -> torch.Tensor:
    """(B, T) bool: which of a tokenizer's max-length-padded positions hold real tokens."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).attention_mask.bool()


#: (UNet keyword, key inside it or None) of the conditioning beside the prompt
_SIDE = (("added_cond_kwargs", "image_embeds"), ("cross_attention_kwargs", "gligen"), ("class_labels", None))


def _zero_rows(value: Any, rows: torch.Tensor, name: str) -> Any:
    """``value`` (a tensor, or lists, tuples and dicts of them) with the batch rows ``rows`` ((N,)
    bool) set to zero; a tensor not batched like the call cannot be cut by sample and raises."""
    if isinstance(value, torch.Tensor):
        if not value.ndim or value.shape[0] != rows.shape[0]:
            raise TensorShapeError(
                name, f"({rows.shape[0]}, ...) batched like the denoiser call", tuple(value.shape)
            )
        return value.masked_fill(rows.view(-1, *[1] * (value.ndim - 1)), 0)
    if isinstance(value, list | tuple):
        return type(value)(_zero_rows(v, rows, f"{name}[{i}]") for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: _zero_rows(v, rows, f"{name}[{k!r}]") for k, v in value.items()}
    return value


def _rows(value: Any, index: slice, full: int) -> Any:
    """``value`` cut to the batch rows ``index`` wherever it is a tensor batched like the call
    (``full`` rows), inside lists, tuples and dicts too; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value[index] if value.ndim and value.shape[0] == full else value
    if isinstance(value, list | tuple):
        return type(value)(_rows(v, index, full) for v in value)
    if isinstance(value, dict):
        return {k: _rows(v, index, full) for k, v in value.items()}
    return value


class StableDiffusionAdapter(Adapter):
    """Guards SD 1.x-style pipelines through a forward pre-hook on ``pipe.unet``."""

    name = "sd1"

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    def components(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.pipe.unet, "text_encoder": self.pipe.text_encoder}

    def latent_channels(self) -> int:
        vae = getattr(self.pipe, "vae", None)
        if vae is not None and hasattr(vae.config, "latent_channels"):
            return int(vae.config.latent_channels)
        return int(self.pipe.unet.config.in_channels)

    def fingerprint(self) -> BackboneFingerprint:
        encoder, tokenizer = self.pipe.text_encoder, self.pipe.tokenizer
        return BackboneFingerprint(
            streams=(TokenStream(STREAM, int(tokenizer.model_max_length), int(encoder.config.hidden_size)),),
            pooled_dim=0,
            latent_channels=self.latent_channels(),
            encoders=(TextEncoderPrint(STREAM, vocab_sha256(tokenizer.get_vocab()), module_sha256(encoder)),),
            family=self.name,
        )

    # -- one pipeline call ---------------------------------------------------------------------

    def call_info(self, args: tuple, kwargs: dict[str, Any]) -> CallInfo:
        bound = _call_signature(self.pipe).bind_partial(self.pipe, *args, **kwargs).arguments
        prompt = bound.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        per_prompt = int(bound.get("num_images_per_prompt") or 1)
        embeds = bound.get("prompt_embeds")
        if prompts is not None:
            batch: int | None = len(prompts) * per_prompt
        elif isinstance(embeds, torch.Tensor):
            batch = int(embeds.shape[0]) * per_prompt
        else:
            batch = None
        return CallInfo(prompts, per_prompt, batch, str(bound.get("output_type") or "pil"))

    def generate(
        self,
        prompts: list[str],
        *,
        seed: int,
        num_inference_steps: int,
        guidance_scale: float,
        output_type: str = "np",
        negative_prompt: list[str] | None = None,
        cond: Conditioning | None = None,
        uncond: Conditioning | None = None,
    ) -> Any:
        kwargs: dict[str, Any] = self._embeds_kwargs(cond, uncond)
        if negative_prompt is not None:
            kwargs["negative_prompt"] = negative_prompt
        return self.pipe(
            None if cond is not None else list(prompts),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=torch.Generator("cpu").manual_seed(int(seed)),
            output_type=output_type,
            **kwargs,
        )

    def _embeds_kwargs(self, cond: Conditioning | None, uncond: Conditioning | None) -> dict[str, Any]:
        """The pipeline-call arguments that pass ``cond`` / ``uncond`` instead of prompts."""
        kwargs: dict[str, Any] = {}
        if cond is not None:
            kwargs["prompt_embeds"] = cond.tokens[0]
        if uncond is not None:
            kwargs["negative_prompt_embeds"] = uncond.tokens[0]
        return kwargs

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.pipe._execution_device, 1, False)
        return Conditioning((embeds,)), real_tokens(self.pipe.tokenizer, prompts)

    def output_images(self, output: Any) -> Any:
        return output[0] if isinstance(output, tuple) else output.images

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> Any:
        """Through the pipeline's VAE at its scaling factor and its image processor, as the
        pipeline's own ``output_type="np"`` ends; a pipeline without a VAE through its own
        ``decode_latents`` ((N, H, W, 3) floats in [0, 1], as diffusers' Stable Diffusion pipelines
        have it)."""
        vae = getattr(self.pipe, "vae", None)
        if vae is not None:
            config = vae.config
            # as the SD and SDXL pipelines end: a float16 VAE that asks for it decodes in float32, and
            # a VAE with per-channel latent statistics un-normalises with them
            upcast = vae.dtype == torch.float16 and getattr(config, "force_upcast", False)
            dtype = torch.float32 if upcast else vae.dtype
            z = latents.to(vae.device, dtype)
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if mean is not None and std is not None:
                shape = (1, -1, *([1] * (z.dim() - 2)))
                mean_t = torch.tensor(mean, device=z.device, dtype=dtype).view(shape)
                std_t = torch.tensor(std, device=z.device, dtype=dtype).view(shape)
                z = z * std_t / config.scaling_factor + mean_t
            else:
                z = z / config.scaling_factor
            if upcast:
                vae.to(dtype=torch.float32)
            try:
                image = vae.decode(z, return_dict=False)[0]
            finally:
                if upcast:
                    vae.to(dtype=torch.float16)
            images = self.pipe.image_processor.postprocess(image, output_type="np")
        elif callable(getattr(self.pipe, "decode_latents", None)):
            images = self.pipe.decode_latents(latents)
        else:
            return super().decode_latents(latents)
        return (np.clip(np.asarray(images, dtype=np.float32), 0, 1) * 255).round().astype(np.uint8)

    def replace_samples(
        self, output: Any, indices: list[int], color: tuple[int, int, int], info: CallInfo
    ) -> Any:
        images = _replace(self.output_images(output), indices, color, latent=info.output_type == "latent")
        if isinstance(output, tuple):
            return (images, *output[1:])
        output.images = images
        return output

    # -- one denoiser call ---------------------------------------------------------------------

    def normalise_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        return timestep.float() / float(self.pipe.scheduler.config.num_train_timesteps)

    def _layout(self, sample: torch.Tensor, batch_size: int | None) -> int | None:
        """The uncond/cond boundary of a denoiser batch (None: no CFG half). A perturbed-attention
        guidance pipeline with CFG batches ``[uncond; cond; cond]`` (the last copy runs with its
        self-attention perturbed): the boundary is the same, and the conditional rows are
        ``[B:2B]``."""
        n = sample.shape[0]
        if batch_size is not None and (n == 2 * batch_size or (n == 3 * batch_size and _is_pag(self.pipe))):
            return batch_size
        if batch_size is None or n == batch_size:
            return None
        raise TensorShapeError(
            "sample",
            f"a batch of {batch_size} (no CFG) or {2 * batch_size} ([uncond; cond])"
            + ("" if not _is_pag(self.pipe) else f" or {3 * batch_size} ([uncond; cond; cond perturbed])"),
            tuple(sample.shape),
        )

    def split(self, args: tuple, kwargs: dict[str, Any], batch_size: int | None) -> DenoiserInputs:
        sample = _get(args, kwargs, "sample")
        timestep = _get(args, kwargs, "timestep")
        embeds = _get(args, kwargs, "encoder_hidden_states")
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=sample.device)
        if embeds.ndim != 3 or embeds.shape[0] != sample.shape[0]:
            raise TensorShapeError("encoder_hidden_states", f"({sample.shape[0]}, T, D)", tuple(embeds.shape))
        half = self._layout(sample, batch_size)
        rows = slice(half, 2 * half) if half is not None else slice(None)
        b = half if half is not None else sample.shape[0]
        t = timestep.reshape(-1)
        if t.numel() == sample.shape[0]:
            t = t[rows]
        elif t.numel() != 1:
            raise TensorShapeError("timestep", f"() or ({sample.shape[0]},)", tuple(timestep.shape))
        timestep = self.normalise_timestep(t).expand(b)
        latents = sample[rows, : self.latent_channels()]
        cond = self._cut(embeds, kwargs, rows)
        uncond = self._cut(embeds, kwargs, slice(None, half)) if half is not None else None
        return DenoiserInputs(latents=latents, timestep=timestep, cond=cond, uncond=uncond)

    def _cut(self, embeds: torch.Tensor, kwargs: dict[str, Any], rows: slice) -> Conditioning:
        """The conditioning of the denoiser batch's ``rows`` (``embeds``: its encoder_hidden_states)."""
        return Conditioning((embeds[rows],))

    def _put(
        self, args: tuple, kwargs: dict[str, Any], halves: list[Conditioning]
    ) -> tuple[tuple, dict[str, Any]]:
        """The call's arguments with the conditioning of ``halves`` (in batch order) put back."""
        return _with_embeds(args, kwargs, torch.cat([c.tokens[0] for c in halves], dim=0))

    def _denoiser_conditioning(self, kwargs: dict[str, Any], cond: Conditioning) -> dict[str, Any]:
        """Keyword arguments that condition a denoiser call on ``cond`` (the other ``kwargs`` already
        cut to its rows)."""
        return {**kwargs, "encoder_hidden_states": cond.tokens[0]}

    def merge(
        self, args: tuple, kwargs: dict[str, Any], inputs: DenoiserInputs
    ) -> tuple[tuple, dict[str, Any]]:
        if inputs.cond is None:
            raise TypeError(
                "the SD adapter batches both CFG halves in one call; an unconditional-only call cannot occur"
            )
        halves = [c for c in (inputs.uncond, inputs.cond) if c is not None]
        if _get(args, kwargs, "sample").shape[0] == 3 * inputs.cond.batch_size:  # PAG: cond twice
            halves.append(inputs.cond)
        return self._put(args, kwargs, halves)

    def _side(self, args: tuple, kwargs: dict[str, Any]) -> list[tuple[str, str | None]]:
        """(keyword, key) of the conditioning beside the prompt that this UNet call carries."""
        found: list[tuple[str, str | None]] = []
        for arg, key in _SIDE:
            value = kwargs.get(arg)
            if key is not None:
                if isinstance(value, dict) and value.get(key) is not None:
                    found.append((arg, key))
            elif (value is not None or len(args) > 3) and self._projects_class_labels():
                if len(args) > 3:
                    raise TypeError(
                        "the UNet got positional arguments after encoder_hidden_states, and it embeds "
                        "class_labels by projection (an image embedding, unCLIP): the guard reads and "
                        "withholds class_labels by keyword only"
                    )
                found.append((arg, key))
        return found

    def _projects_class_labels(self) -> bool:
        """Whether the UNet embeds ``class_labels`` by projection (unCLIP's image embedding)."""
        config = getattr(unwrap_compiled(self.pipe.unet), "config", None)
        return getattr(config, "class_embed_type", None) in ("projection", "simple_projection")

    def side_conditioning(self, args: tuple, kwargs: dict[str, Any]) -> list[str]:
        return [arg if key is None else f"{arg}[{key!r}]" for arg, key in self._side(args, kwargs)]

    def withhold_side_conditioning(
        self,
        args: tuple,
        kwargs: dict[str, Any],
        moved_cond: torch.Tensor,
        moved_uncond: torch.Tensor | None,
    ) -> tuple[tuple, dict[str, Any]]:
        rows = moved_cond if moved_uncond is None else torch.cat([moved_uncond, moved_cond])
        if _get(args, kwargs, "sample").shape[0] == 3 * moved_cond.shape[0]:  # PAG: cond twice
            rows = torch.cat([rows, moved_cond])
        kwargs = dict(kwargs)
        for arg, key in self._side(args, kwargs):
            if key is None:
                kwargs[arg] = _zero_rows(kwargs[arg], rows, arg)
            else:
                kwargs[arg] = {**kwargs[arg], key: _zero_rows(kwargs[arg][key], rows, f"{arg}[{key!r}]")}
        return args, kwargs

    def split_output(
        self, output: Any, inputs: DenoiserInputs
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        pred = output[0] if isinstance(output, tuple) else output.sample
        if inputs.uncond is None:
            return None, pred
        if pred.shape[0] != 2 * inputs.latents.shape[0]:
            raise TypeError(
                "split_output: only a [uncond; cond] prediction (not perturbed-attention guidance)"
            )
        half = pred.shape[0] // 2
        return pred[:half], pred[half:]

    def merge_output(self, output: Any, uncond: torch.Tensor | None, cond: torch.Tensor | None) -> Any:
        new = torch.cat([p for p in (uncond, cond) if p is not None])
        if isinstance(output, tuple):
            return (new, *output[1:])
        output.sample = new
        return output

    def run_denoiser(
        self, args: tuple, kwargs: dict[str, Any], inputs: DenoiserInputs, cond: Conditioning
    ) -> torch.Tensor:
        sample = _get(args, kwargs, "sample")
        timestep = _get(args, kwargs, "timestep")
        full = sample.shape[0]
        rows = slice(full - inputs.latents.shape[0], None)
        rest = {k: _rows(v, rows, full) for k, v in kwargs.items() if k not in _UNET_ARGS}
        rest["return_dict"] = False
        out = self.denoiser(
            sample[rows], _rows(timestep, rows, full), **self._denoiser_conditioning(rest, cond)
        )
        return out[0]


def _with_embeds(args: tuple, kwargs: dict[str, Any], embeds: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
    """A UNet call's (args, kwargs) with ``encoder_hidden_states`` replaced, wherever it was passed."""
    if "encoder_hidden_states" in kwargs or len(args) < 3:
        return args, {**kwargs, "encoder_hidden_states": embeds}
    return (*args[:2], embeds, *args[3:]), kwargs


def _replace(images: Any, indices: list[int], color: tuple[int, int, int], *, latent: bool) -> Any:
    if isinstance(images, list):
        images = list(images)
        for i in indices:
            images[i] = Image.new(
                images[i].mode if images[i].mode in ("RGB", "RGBA") else "RGB", images[i].size, color
            )
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
            images[indices] = (
                torch.tensor(color, dtype=images.dtype, device=images.device).view(1, -1, 1, 1) / 255.0
            )
        return images
    raise TypeError(f"cannot place a placeholder into pipeline output of type {type(images).__name__}")


def _is_pag(pipeline: Any) -> bool:
    """A perturbed-attention guidance pipeline (diffusers' ``PAGMixin``), which batches its
    conditional rows twice when ``pag_scale`` > 0."""
    from diffusers.pipelines.pag.pag_utils import PAGMixin

    return isinstance(pipeline, PAGMixin)


def is_sd_like(pipeline: Any) -> bool:
    """A pipeline with one text encoder, a tokenizer and a UNet2DConditionModel without SDXL's
    added text-time conditioning."""
    from diffusers import UNet2DConditionModel

    unet = unwrap_compiled(getattr(pipeline, "unet", None))  # torch.compile(unet) is the same UNet
    return (
        isinstance(unet, UNet2DConditionModel)
        and getattr(pipeline, "text_encoder", None) is not None
        and getattr(pipeline, "tokenizer", None) is not None
        and getattr(pipeline, "text_encoder_2", None) is None
        and unet.config.addition_embed_type is None
    )


@hookimpl
def saferedir_make_adapter(pipeline: Any) -> Adapter | None:
    return StableDiffusionAdapter(pipeline) if is_sd_like(pipeline) else None
