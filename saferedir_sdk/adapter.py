"""The adapter contract: everything the guard, the trainer and the benchmark need to know about a
backbone family, so that nothing outside an adapter touches diffusers.

An adapter is bound to one pipeline (``saferedir_make_adapter(pipeline)`` returns one, or None if
it does not know the pipeline). Adapters are plugins: the SDK's own Stable Diffusion adapter
(``adapters/``) is registered exactly as a third party's FLUX adapter would be.

Three kinds of facts pass through it:

* **What the backbone is** -- :attr:`Adapter.denoiser`, :meth:`Adapter.fingerprint`,
  :meth:`Adapter.describe`.
* **One pipeline call** -- :meth:`Adapter.call_info` (prompts, images per prompt, batch size,
  output type, from the call's own arguments), :meth:`Adapter.generate` (drive the pipeline:
  training and the benchmark never call ``pipe(...)`` with backbone-specific arguments),
  :meth:`Adapter.encode_prompts`, :meth:`Adapter.replace_samples` (``block``'s placeholders),
  :meth:`Adapter.decode_latents` (optional: training's blends label a mixed last latent by its image).
* **One denoiser call** -- :meth:`Adapter.split` cuts its arguments into a :class:`DenoiserInputs`
  (the latent view, the normalised timestep, the conditional and unconditional
  :class:`~saferedir_sdk.conditioning.Conditioning`), :meth:`Adapter.merge` puts a (redirected)
  one back, :meth:`Adapter.side_conditioning` names what else the call is conditioned on that can
  carry a concept (an image prompt, grounding phrases) and
  :meth:`Adapter.withhold_side_conditioning` withholds it from the samples whose prompt moved,
  :meth:`Adapter.split_output`/:meth:`Adapter.merge_output` take its prediction apart and
  together, and :meth:`Adapter.run_denoiser` calls it on the conditional rows with other
  conditioning (what Safe Latent Diffusion's extra pass needs).

Per-call facts (classifier-free guidance on or off, the batch layout) come from the call's own
tensors and the pipeline call's batch size, never from pipeline-global attributes, so concurrent
calls with different settings do not disturb each other.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .conditioning import Conditioning
from .fingerprint import BackboneFingerprint


@dataclass(frozen=True)
class CallInfo:
    """What the guard records about one pipeline call before it runs.

    Attributes:
        prompts: the text prompts, one per prompt of the batch, or None when the caller passed
            embeddings directly. Sample ``i`` belongs to prompt ``i // num_images_per_prompt``.
        num_images_per_prompt: images per prompt.
        batch_size: images the call makes (prompts x images per prompt), or None when the
            arguments do not say (then the first denoiser call cannot be attributed and the
            adapter's :meth:`Adapter.split` must tell CFG from its tensors alone, or fail).
        output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
    """

    prompts: list[str] | None
    num_images_per_prompt: int
    batch_size: int | None
    output_type: str


@dataclass(frozen=True)
class DenoiserInputs:
    """One denoiser call, cut into what the redirector reads.

    Attributes:
        latents: (B, C, H, W) latent view of the call's samples (for a CFG batch the conditional
            half's; packed latents unpacked, extra input channels such as inpainting's mask and
            masked image left out).
        timestep: (B,) timestep on the normalised scale: 0 a clean sample .. 1 pure noise (DDPM
            ``t / num_train_timesteps``; flow-matching sigma).
        cond: conditional conditioning of the B samples, or None when the call is an unconditional
            call of its own (a backbone that runs the CFG halves as separate calls).
        uncond: unconditional conditioning of a CFG batch (or of an unconditional-only call), else
            None.
    """

    latents: torch.Tensor
    timestep: torch.Tensor
    cond: Conditioning | None
    uncond: Conditioning | None


class Adapter(ABC):
    """Integration of one backbone family, bound to one pipeline (``self.pipe``)."""

    #: short family name recorded in fingerprints and audit records (``"sd1"``, ``"sdxl"``, ...)
    name: str = "adapter"

    def __init__(self, pipe: Any):
        self.pipe = pipe

    # -- what the backbone is ----------------------------------------------------------------

    @property
    @abstractmethod
    def denoiser(self) -> nn.Module:
        """The module whose forward pre-hook sees every denoising call (a UNet or a transformer)."""

    def components(self) -> dict[str, nn.Module]:
        """The modules a guarded call depends on, by name (the denoiser, the text encoders): the
        guard checks per call that each is still the object it wrapped (a swap after ``wrap`` is an
        enforcement failure, not a silent bypass)."""
        return {"denoiser": self.denoiser}

    def tokenizers(self) -> dict[str, Any]:
        """The tokenizers whose vocabularies the fingerprint hashes, by name: the guard checks per
        call that each is still the object it wrapped, with as many tokens (a token added after
        ``wrap``, as a textual inversion adds one, is another vocabulary). By default the
        pipeline's ``tokenizer``, ``tokenizer_2`` and ``tokenizer_3`` where it has them."""
        names = ("tokenizer", "tokenizer_2", "tokenizer_3")
        return {name: tok for name in names if (tok := getattr(self.pipe, name, None)) is not None}

    def conditioned_modules(self) -> dict[str, nn.Module]:
        """Modules besides the denoiser that read the prompt's conditioning in a denoising step,
        called before the denoiser with the arguments :meth:`split` and :meth:`merge` read
        (``sample``, ``timestep``, ``encoder_hidden_states``, as the denoiser gets them). The guard
        hooks them too: the step decides and redirects at the first of its calls, and every one of
        them and the denoiser receive that step's redirected conditioning, so nothing the denoiser
        reads comes from the original prompt. By default ``pipe.controlnet`` (a ControlNet or a
        ``MultiControlNetModel``) when the pipeline has one."""
        controlnet = getattr(self.pipe, "controlnet", None)
        return {"controlnet": controlnet} if isinstance(controlnet, nn.Module) else {}

    @abstractmethod
    def fingerprint(self) -> BackboneFingerprint:
        """The backbone fingerprint: token streams (names and (T, D)), pooled width, latent-view
        channels, and one entry per text encoder (tokenizer and weights hashes)."""

    def sampler_defaults(self) -> tuple[int, float]:
        """(num_inference_steps, guidance_scale) the pipeline's ``__call__`` defaults to: what
        training samples with unless told otherwise."""
        for cls in type(self.pipe).__mro__:
            fn = cls.__dict__.get("__call__")
            if fn is None:
                continue
            params = inspect.signature(fn).parameters
            if "num_inference_steps" in params and "guidance_scale" in params:
                return int(params["num_inference_steps"].default), float(params["guidance_scale"].default)
        raise TypeError(
            f"{type(self.pipe).__name__}.__call__ has no num_inference_steps/guidance_scale defaults"
        )

    def describe(self) -> dict[str, Any]:
        """Facts for audit records (adapter family and pipeline class by default)."""
        return {"adapter": self.name, "pipeline": type(self.pipe).__name__}

    # -- one pipeline call -------------------------------------------------------------------

    @abstractmethod
    def call_info(self, args: tuple, kwargs: dict[str, Any]) -> CallInfo:
        """Prompts, images per prompt, batch size and output type of a pipeline call, from its
        arguments."""

    @abstractmethod
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
        """Run the pipeline on ``prompts`` (B) with a CPU generator seeded ``seed``; ``cond`` /
        ``uncond`` (B each) replace the encoded prompts / negative prompts when given. Returns the
        pipeline's own output object."""

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> tuple[Conditioning, torch.Tensor]:
        """The conditional conditioning of ``prompts`` (B) as the denoiser receives it, and a
        (B, sum of the streams' T) bool mask of the real (non-padding) tokens."""

    @abstractmethod
    def output_images(self, output: Any) -> Any:
        """The images (or latents) of a pipeline output: a list of PIL images, an (N, H, W, 3)
        array or an (N, C, H, W) tensor, as the call's ``output_type`` asked."""

    def decode_latents(self, latents: torch.Tensor) -> Any:
        """(N, H, W, 3) uint8 images of (N, ...) latent views as a generation's last step leaves
        them (what the pipeline would decode). Training's blends need it (``TrainConfig.blends``);
        an adapter that cannot decode says so."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot decode latents (blends need an adapter that does)"
        )

    @abstractmethod
    def replace_samples(
        self, output: Any, indices: list[int], color: tuple[int, int, int], info: CallInfo
    ) -> Any:
        """The pipeline's output with the images of ``indices`` replaced by a solid ``color``
        placeholder (zeros where the output is latents)."""

    # -- one denoiser call -------------------------------------------------------------------

    @abstractmethod
    def split(self, args: tuple, kwargs: dict[str, Any], batch_size: int | None) -> DenoiserInputs:
        """Cut a denoiser call's (args, kwargs) apart. ``batch_size``: the pipeline call's
        :attr:`CallInfo.batch_size`; a denoiser batch of twice that is ``[uncond; cond]``."""

    @abstractmethod
    def merge(
        self, args: tuple, kwargs: dict[str, Any], inputs: DenoiserInputs
    ) -> tuple[tuple, dict[str, Any]]:
        """The denoiser call's (args, kwargs) with ``inputs``' (possibly redirected) conditioning put
        back; every other argument untouched."""

    def side_conditioning(self, args: tuple, kwargs: dict[str, Any]) -> list[str]:
        """Names of what a denoiser call is conditioned on besides the prompt's conditioning that
        can carry a concept the redirector cannot move: an image prompt (IP-Adapter image
        embeddings), grounding phrases (GLIGEN), an image embedding drawn from the prompt
        (unCLIP's ``class_labels``). The guard withholds these from every sample whose prompt it
        moves in that call (:meth:`withhold_side_conditioning`) and records the names. Default:
        none."""
        return []

    def withhold_side_conditioning(
        self,
        args: tuple,
        kwargs: dict[str, Any],
        moved_cond: torch.Tensor,
        moved_uncond: torch.Tensor | None,
    ) -> tuple[tuple, dict[str, Any]]:
        """The denoiser call's (args, kwargs) with the rows of :meth:`side_conditioning` of the samples
        whose conditioning the guard moved set to zeros (what diffusers feeds as "no image prompt",
        "no grounding", "no image embedding"). ``moved_cond`` / ``moved_uncond``: (B,) bool over the
        conditional / unconditional rows of the call (None: no unconditional half). A side
        conditioning whose rows cannot be told apart must raise (the guard then fails closed).
        Default: the call unchanged (an adapter without side conditioning)."""
        return args, kwargs

    @abstractmethod
    def split_output(
        self, output: Any, inputs: DenoiserInputs
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The denoiser's prediction for the (uncond, cond) rows of the call ``inputs`` came from
        (None for a half the call does not have), each (B, ...) in the denoiser's own layout."""

    @abstractmethod
    def merge_output(self, output: Any, uncond: torch.Tensor | None, cond: torch.Tensor | None) -> Any:
        """The denoiser's output object with its prediction rows replaced (inverse of
        :meth:`split_output`)."""

    @abstractmethod
    def run_denoiser(
        self, args: tuple, kwargs: dict[str, Any], inputs: DenoiserInputs, cond: Conditioning
    ) -> torch.Tensor:
        """Call the denoiser once more on the conditional rows of this call with ``cond`` as their
        conditioning (everything else as in the call); returns that prediction (B, ...)."""

    @abstractmethod
    def normalise_timestep(self, timestep: torch.Tensor) -> torch.Tensor:
        """A denoiser-call timestep on the normalised 0 (clean) .. 1 (noise) scale."""
