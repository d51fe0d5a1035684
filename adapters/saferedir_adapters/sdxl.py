"""Stable Diffusion XL adapter: ``StableDiffusionXLPipeline``, its img2img and inpaint variants,
and refiner-style pipelines with only the second text encoder.

How a UNet call maps onto the contract (``unet(sample, timestep, encoder_hidden_states,
added_cond_kwargs={"text_embeds", "time_ids"}, **rest)``):

================================  ==============================================================
``encoder_hidden_states``          two token streams side by side on the feature axis:
(2B or B, 77, D1 + D2)             ``text_encoder`` (D1, CLIP-L: 768) then ``text_encoder_2``
                                   (D2, OpenCLIP-G: 1280); a refiner has only the second
``added_cond_kwargs["text_embeds"]``  the pooled embedding (``text_encoder_2``'s projection,
(2B or B, P)                       1280): read and redirected like the tokens
``added_cond_kwargs["time_ids"]``  untouched (size and crop conditioning)
``sample``, ``timestep``, CFG      as SD 1.x (an inpainting UNet's 9 input channels: the first
                                   ``latent_channels`` are read)
================================  ==============================================================
"""

from __future__ import annotations

from typing import Any

import torch

from saferedir_sdk import hookimpl
from saferedir_sdk.adapter import Adapter, CallInfo
from saferedir_sdk.conditioning import Conditioning, TokenStream
from saferedir_sdk.errors import TensorShapeError
from saferedir_sdk.fingerprint import (
    BackboneFingerprint,
    TextEncoderPrint,
    module_sha256,
    unwrap_compiled,
    vocab_sha256,
)

from .sd import StableDiffusionAdapter, _call_signature, _with_embeds, real_tokens

ENCODERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """Guards SDXL-style pipelines through a forward pre-hook on ``pipe.unet``."""

    name = "sdxl"

    def _encoders(self) -> list[tuple[str, Any, Any]]:
        """(stream name, text encoder, tokenizer) of each encoder the pipeline has, in order."""
        return [
            (name, getattr(self.pipe, name), getattr(self.pipe, tok))
            for name, tok in ENCODERS
            if getattr(self.pipe, name, None) is not None
        ]

    def components(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.pipe.unet, **{name: enc for name, enc, _ in self._encoders()}}

    def _streams(self) -> tuple[TokenStream, ...]:
        return tuple(
            TokenStream(name, int(tok.model_max_length), int(enc.config.hidden_size))
            for name, enc, tok in self._encoders()
        )

    def fingerprint(self) -> BackboneFingerprint:
        return BackboneFingerprint(
            streams=self._streams(),
            pooled_dim=int(self.pipe.text_encoder_2.config.projection_dim),
            latent_channels=self.latent_channels(),
            encoders=tuple(
                TextEncoderPrint(name, vocab_sha256(tok.get_vocab()), module_sha256(enc))
                for name, enc, tok in self._encoders()
            ),
            family=self.name,
        )

    def call_info(self, args: tuple, kwargs: dict[str, Any]) -> CallInfo:
        """As SD's; a ``prompt_2`` (the second encoder's prompt) is part of what the audit records:
        each prompt becomes ``"PROMPT\\nPROMPT_2"`` where the two differ."""
        info = super().call_info(args, kwargs)
        second = _call_signature(self.pipe).bind_partial(self.pipe, *args, **kwargs).arguments.get("prompt_2")
        if info.prompts is None or second is None:
            return info
        seconds = [second] * len(info.prompts) if isinstance(second, str) else list(second)
        prompts = [p if p == q else f"{p}\n{q}" for p, q in zip(info.prompts, seconds)]
        return CallInfo(prompts, info.num_images_per_prompt, info.batch_size, info.output_type)

    def _embeds_kwargs(self, cond: Conditioning | None, uncond: Conditioning | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if cond is not None:
            kwargs.update(prompt_embeds=torch.cat(cond.tokens, dim=-1), pooled_prompt_embeds=cond.pooled)
        if uncond is not None:
            kwargs.update(
                negative_prompt_embeds=torch.cat(uncond.tokens, dim=-1),
                negative_pooled_prompt_embeds=uncond.pooled,
            )
        return kwargs

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts),
            device=self.pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        masks = [real_tokens(tok, prompts) for _, _, tok in self._encoders()]
        return self._tokens(embeds, pooled), torch.cat(masks, dim=1)

    def _tokens(self, embeds: torch.Tensor, pooled: torch.Tensor) -> Conditioning:
        dims = [s.dim for s in self._streams()]
        if embeds.ndim != 3 or embeds.shape[-1] != sum(dims):
            raise TensorShapeError(
                "encoder_hidden_states", f"(N, T, {' + '.join(map(str, dims))})", tuple(embeds.shape)
            )
        return Conditioning(tuple(torch.split(embeds, dims, dim=-1)), pooled)

    def _cut(self, embeds: torch.Tensor, kwargs: dict[str, Any], rows: slice) -> Conditioning:
        pooled = (kwargs.get("added_cond_kwargs") or {}).get("text_embeds")
        if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2 or pooled.shape[0] != embeds.shape[0]:
            got = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else (type(pooled).__name__,)
            raise TensorShapeError("added_cond_kwargs['text_embeds']", f"({embeds.shape[0]}, P)", got)
        return self._tokens(embeds[rows], pooled[rows])

    def _put(
        self, args: tuple, kwargs: dict[str, Any], halves: list[Conditioning]
    ) -> tuple[tuple, dict[str, Any]]:
        embeds = torch.cat([torch.cat(c.tokens, dim=-1) for c in halves], dim=0)
        pooled = torch.cat([c.pooled for c in halves], dim=0)  # type: ignore[misc]
        args, kwargs = _with_embeds(args, kwargs, embeds)
        return args, {**kwargs, "added_cond_kwargs": {**kwargs["added_cond_kwargs"], "text_embeds": pooled}}

    def _denoiser_conditioning(self, kwargs: dict[str, Any], cond: Conditioning) -> dict[str, Any]:
        added = {**kwargs.get("added_cond_kwargs", {}), "text_embeds": cond.pooled}
        return {**kwargs, "encoder_hidden_states": torch.cat(cond.tokens, dim=-1), "added_cond_kwargs": added}


def is_sdxl_like(pipeline: Any) -> bool:
    """A ``UNet2DConditionModel`` with SDXL's ``text_time`` added conditioning and a second text
    encoder with a projection (the pooled embedding)."""
    from diffusers import UNet2DConditionModel

    unet = unwrap_compiled(getattr(pipeline, "unet", None))  # torch.compile(unet) is the same UNet
    encoder_2 = getattr(pipeline, "text_encoder_2", None)
    return (
        isinstance(unet, UNet2DConditionModel)
        and unet.config.addition_embed_type == "text_time"
        and encoder_2 is not None
        and getattr(pipeline, "tokenizer_2", None) is not None
        and hasattr(encoder_2.config, "projection_dim")
    )


@hookimpl
def saferedir_make_adapter(pipeline: Any) -> Adapter | None:
    return StableDiffusionXLAdapter(pipeline) if is_sdxl_like(pipeline) else None
