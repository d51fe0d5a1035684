"""Loading a backbone from a diffusers pipeline folder (``saferedir train --backbone FOLDER``):
any folder ``DiffusionPipeline.save_pretrained`` wrote, read offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saferedir_sdk import hookimpl


@hookimpl
def saferedir_load_backbone(name: str, device: str) -> Any:
    folder = Path(name)
    if not (folder / "model_index.json").is_file():
        return None
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
