"""Loading backbones: a diffusers pipeline folder (``saferedir train --backbone FOLDER``: any folder
``DiffusionPipeline.save_pretrained`` wrote, read offline), and edited component weights for a
pre-unlearned backbone (:func:`load_component_weights`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saferedir_sdk import hookimpl
from saferedir_sdk.errors import ComponentWeightsError


@hookimpl
def saferedir_load_backbone(name: str, device: str) -> Any:
    folder = Path(name)
    if not (folder / "model_index.json").is_file():
        return None
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_component_weights(pipe: Any, component: str, path: str | Path) -> Any:
    """Replace the weights of ``pipe.<component>`` in place from a safetensors file, for a
    pre-unlearned backbone: ``"unet"`` for an ESD/UCE-style edited UNet (bundles stay valid: a
    bundle's fingerprint names the text encoders, not the UNet), ``"text_encoder"`` for an
    AdvUnlearn-style encoder (the fingerprint changes: the policy's ``encoder_mismatch`` decides).
    Every tensor of the module must be in the file with its shape, and nothing else. Returns ``pipe``.

    Call it before ``guard.wrap(pipe)``: a wrapped pipeline is refused, since the guard hashed the
    weights it wrapped and records those hashes. Never unpickles anything.

    Raises:
        ComponentWeightsError: the pipeline is wrapped, has no such module, the file is missing or
            not safetensors, or its tensors do not match the module (missing, unexpected, shape).
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if "_saferedir_wrapping" in pipe.__dict__:
        raise ComponentWeightsError(
            f"cannot load {component} weights into a wrapped {type(pipe).__name__}: unwrap it, load, wrap again"
        )
    module = getattr(pipe, component, None)
    if not isinstance(module, torch.nn.Module):
        raise ComponentWeightsError(f"{type(pipe).__name__} has no module '{component}'")
    file = Path(path)
    if not file.is_file():
        raise ComponentWeightsError(f"{file}: no such file (weights for {component})")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ComponentWeightsError(f"{file}: not a safetensors file ({exc})") from exc
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("of the wrong shape", wrong)):
        if keys:
            raise ComponentWeightsError(
                f"{file}: {len(keys)} tensor(s) {what} for {component} ({type(module).__name__}), e.g. {keys[:3]}"
            )
    module.load_state_dict(state, strict=True)
    return pipe
