"""The pack's plugin module (entry point ``vangogh`` in the ``saferedir`` group).

Registering is cheap and has no side effects: the recipe is read only when a trainer asks for it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from saferedir_sdk import ConceptSpec, hookimpl

HERE = Path(__file__).parent
CONCEPT = "vangogh"
CATEGORY = "artist_style"
DESCRIPTION = "Van Gogh's painting style"


@cache
def recipe_data() -> dict:
    """recipe.json: training ``pairs`` [forget, retain], benign ``pool``, and ``held_out`` prompts."""
    return json.loads((HERE / "recipe.json").read_text(encoding="utf-8"))


def recipe() -> tuple[list[tuple[str, str]], list[str]]:
    """What ``saferedir train --pairs plugin:vangogh`` trains on (never the held-out prompts)."""
    data = recipe_data()
    return [(f, r) for f, r in data["pairs"]], list(data["pool"])


def bundles() -> tuple[Path, ...]:
    """The trained bundles this pack ships, one per backbone."""
    return tuple(sorted((HERE / "bundles").glob("*.safetensors")))


@hookimpl
def saferedir_register_concepts() -> list[ConceptSpec]:
    return [ConceptSpec(CONCEPT, CATEGORY, bundles(), DESCRIPTION, recipe=recipe)]


@hookimpl
def saferedir_register_policies() -> dict[str, Path]:
    return {"default": HERE / "policies" / "default.yaml"}
