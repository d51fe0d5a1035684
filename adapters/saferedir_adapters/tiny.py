"""Tiny Stable Diffusion 1.x pipelines with random weights, built from configs offline.

For tests and the mechanics demo only: the weights are random (seeded), the images mean
nothing; :func:`fit_tiny_redirector` fits a real redirector on such a pipeline's trajectories. The sizes are those of ../shared/design/NOTES.md (UNet (32, 64), 4 latent channels,
CLIP text encoder with 32-d tokens and 77 positions); the tokenizer is a real ``CLIPTokenizer``
over a byte-level vocabulary without merges (one token per character).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from saferedir_sdk.adapter import Adapter
from saferedir_sdk.capacity import Capacity
from saferedir_sdk.redirector import Redirector, RedirectorConfig
from saferedir_sdk.training import fit_redirector, record_trajectories

from .sd import StableDiffusionAdapter


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def char_clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer with one token per byte (vocab 514: bytes, bytes + ``</w>``, start, end)."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_sd_pipeline(
    seed: int = 0,
    *,
    token_dim: int = 32,
    seq_len: int = 77,
    in_channels: int = 4,
    prediction_type: str = "epsilon",
    pipeline_class: type | None = None,
    unet_config: dict[str, Any] | None = None,
) -> StableDiffusionPipeline:
    """A random-weights SD 1.x pipeline (64x64 images, 32x32x4 latents), deterministic in ``seed``.
    SD 2.x-shaped: another ``token_dim`` and ``prediction_type="v_prediction"``; inpainting:
    ``in_channels=9`` with ``pipeline_class=StableDiffusionInpaintPipeline``. ``unet_config``: more
    ``UNet2DConditionModel`` arguments (GLIGEN's ``attention_type="gated"``, unCLIP's projected
    class embedding)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=token_dim,
        **(unet_config or {}),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    vae = _tiny_vae(seed)
    text_encoder = tiny_clip(seed, token_dim, seq_len)
    pipe = (pipeline_class or StableDiffusionPipeline)(
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=char_clip_tokenizer(seq_len),
        unet=unet.eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet_pipeline(seed: int = 0, *, xl: bool = False) -> Any:
    """:func:`tiny_sd_pipeline` (or :func:`tiny_sdxl_pipeline` with ``xl``) of ``seed`` with a
    ControlNet made from its UNet (``ControlNetModel.from_unet``: the same prompt layout, SDXL's
    added conditioning included), whose zero convolutions get small random weights (seeded) so that
    its residuals reach the UNet as a trained ControlNet's do: a ``StableDiffusionControlNetPipeline``
    or ``StableDiffusionXLControlNetPipeline`` taking a 64x64 ``image``."""
    base = tiny_sdxl_pipeline(seed) if xl else tiny_sd_pipeline(seed)
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32)).eval()
    with torch.no_grad():
        for block in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block):
            for weight in block.parameters():
                weight.normal_(0.0, 0.05)
    cls = StableDiffusionXLControlNetPipeline if xl else StableDiffusionControlNetPipeline
    pipe = cls(**base.components, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _tiny_vae(seed: int, **extra: Any) -> AutoencoderKL:
    """The tiny VAE (64x64 images <-> 32x32x4 latents), seeded."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        **extra,
    )


def tiny_clip(seed: int, token_dim: int, seq_len: int, projection_dim: int | None = None) -> torch.nn.Module:
    """A random-weights CLIP text encoder (5 layers, ``token_dim`` wide, vocabulary 1000) of
    ``seed``; with ``projection_dim`` a ``CLIPTextModelWithProjection`` (SDXL's second encoder,
    unCLIP's prior encoder)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=token_dim,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=1000,
        max_position_embeddings=seq_len,
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def tiny_sdxl_pipeline(
    seed: int = 0,
    *,
    token_dim: int = 32,
    seq_len: int = 77,
    pipeline_class: type | None = None,
    second_encoder_only: bool = False,
) -> StableDiffusionXLPipeline:
    """A random-weights SDXL pipeline (two text encoders of ``token_dim`` each side by side, a
    pooled ``token_dim`` projection, ``text_time`` added conditioning; 64x64 images), deterministic
    in ``seed``. ``pipeline_class``: the img2img or inpaint class over the same components;
    ``second_encoder_only``: refiner-style, ``text_encoder_2`` alone."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + token_dim,
        cross_attention_dim=(1 if second_encoder_only else 2) * token_dim,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    vae = _tiny_vae(seed, sample_size=128)
    cls = pipeline_class or StableDiffusionXLPipeline
    pipe = cls(
        vae=vae.eval(),
        text_encoder=None if second_encoder_only else tiny_clip(seed, token_dim, seq_len),
        text_encoder_2=tiny_clip(seed + 1, token_dim, seq_len, projection_dim=token_dim),
        tokenizer=None if second_encoder_only else char_clip_tokenizer(seq_len),
        tokenizer_2=char_clip_tokenizer(seq_len),
        unet=unet.eval(),
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Paired prompts for redirectors fitted on a tiny pipeline (the mechanics demo and the tests): the
# concept word swapped for a same-length neighbour (the tiny tokenizer is per character).
PAIRS = {
    "red": [
        ("a red circle", "a tan circle"),
        ("a red square", "a tan square"),
        ("red star", "tan star"),
        ("a big red cross", "a big tan cross"),
        ("one red dot", "one tan dot"),
    ],
    "star": [
        ("a blue star", "a blue moon"),
        ("star in a box", "moon in a box"),
        ("a green star", "a green moon"),
        ("big star", "big moon"),
        ("the star", "the moon"),
    ],
}
# unpaired benign prompts: what "not the concept" looks like beyond the paired neighbours
RETAIN_POOL = ["a tan circle", "a blue moon", "a green square", "tan star", "a blue circle", "one dot"]
#: a small capacity that fits in seconds on a CPU
TINY_CAPACITY = Capacity(hidden_dim=64, rank=8, num_heads=4, latent_pool=8, token_layers=0)


def tiny_adapter(pipe: Any) -> Adapter:
    """The first-party adapter for ``pipe`` (SDXL-shaped or SD-shaped)."""
    from .sdxl import StableDiffusionXLAdapter, is_sdxl_like

    return StableDiffusionXLAdapter(pipe) if is_sdxl_like(pipe) else StableDiffusionAdapter(pipe)


def fit_tiny_redirector(
    pipe: Any,
    pairs: list[tuple[str, str]],
    *,
    num_inference_steps: int = 4,
    seeds: tuple[int, ...] = (0, 1),
    fit_steps: int = 200,
    seed: int = 0,
    capacity: Capacity = TINY_CAPACITY,
) -> Redirector:
    """A real redirector fitted on ``pipe``'s own trajectories of ``pairs`` (plus the benign
    :data:`RETAIN_POOL` prompts that are not forget prompts), in seconds."""
    adapter = tiny_adapter(pipe)
    kwargs = {"seeds": seeds, "num_inference_steps": num_inference_steps, "guidance_scale": 7.5}
    forget = record_trajectories(adapter, [f for f, _ in pairs], **kwargs)
    retain = record_trajectories(adapter, [r for _, r in pairs], **kwargs)
    pool = record_trajectories(adapter, [p for p in RETAIN_POOL if all(p != f for f, _ in pairs)], **kwargs)
    torch.manual_seed(seed)
    redirector = Redirector(RedirectorConfig.for_backbone(adapter.fingerprint(), capacity))
    fit_redirector(redirector, forget, retain, negatives=pool, steps=fit_steps, batch_size=32, seed=seed)
    return redirector
