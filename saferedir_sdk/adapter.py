"""What the guard needs to know about a backbone family, as an interface adapters implement.

Adapters are plugins (``saferedir_make_adapter`` hook): the SDK's own Stable Diffusion adapter is
registered exactly like a third party's FLUX adapter would be. The core never imports diffusers;
everything that knows a pipeline's layout lives behind this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .fingerprint import BackboneFingerprint


@dataclass(frozen=True)
class CallInfo:
    """What the guard records about one pipeline call before it runs.

    ``prompts``: the text prompts, one per prompt in the batch, or None when the caller passed
    ``prompt_embeds`` directly. Sample ``i`` of the batch belongs to prompt ``i // num_images_per_prompt``.
    """

    prompts: list[str] | None
    num_images_per_prompt: int
    output_type: str


@dataclass(frozen=True)
class DenoiserInputs:
    """One denoiser call, split into its conditional and unconditional halves.

    Attributes:
        latents: (B, C, H, W) latents of the conditional samples.
        timestep: () or (B,) timestep tensor.
        cond: (B, T, D) conditional prompt embeddings.
        uncond: (B, T, D) unconditional embeddings when classifier-free guidance batches them in,
            else None.
    """

    latents: torch.Tensor
    timestep: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor | None


class Adapter(ABC):
    """Integration of one backbone family (see ``adapters/`` for the first-party ones)."""

    #: short name recorded in audit records (``"sd1"``, ``"sdxl"``, ...)
    name: str = "adapter"

    @abstractmethod
    def denoiser(self, pipe: Any) -> nn.Module:
        """The module whose forward pre-hook sees every denoising call (a UNet or transformer)."""

    @abstractmethod
    def fingerprint(self, pipe: Any) -> BackboneFingerprint:
        """The pipeline's backbone fingerprint (dims, tokenizer and text-encoder hashes)."""

    @abstractmethod
    def call_info(self, pipe: Any, args: tuple, kwargs: dict[str, Any]) -> CallInfo:
        """Prompts, images per prompt and output type of a pipeline call, from its arguments."""

    @abstractmethod
    def split_denoiser_inputs(self, pipe: Any, args: tuple, kwargs: dict[str, Any]) -> DenoiserInputs:
        """Take a denoiser call's (args, kwargs) apart into the halves the engine works on."""

    @abstractmethod
    def merge_denoiser_inputs(
        self, pipe: Any, args: tuple, kwargs: dict[str, Any], cond: torch.Tensor, uncond: torch.Tensor | None
    ) -> tuple[tuple, dict[str, Any]]:
        """The denoiser call's (args, kwargs) with the (possibly redirected) embeddings put back."""

    @abstractmethod
    def replace_samples(
        self, pipe: Any, output: Any, indices: list[int], color: tuple[int, int, int], info: CallInfo
    ) -> Any:
        """The pipeline's output with the images of ``indices`` replaced by a solid ``color``
        placeholder (zeros where the output is latents)."""

    def describe(self, pipe: Any) -> dict[str, Any]:
        """Extra facts for audit records (pipeline class by default)."""
        return {"adapter": self.name, "pipeline": type(pipe).__name__}
