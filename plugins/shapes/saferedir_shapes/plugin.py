"""saferedir plugin entry point of the Shapes pack: its backbone, its concepts, `saferedir demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from saferedir_sdk import ConceptSpec, hookimpl

BUNDLES = Path(__file__).parent / "weights"
CONCEPTS = {
    "shapes-red": ("red", "nsfw", "the colour red (stands in for an NSFW attribute)"),
    "shapes-striped": ("striped", "artist_style", "striped texture (stands in for an artist's style)"),
    "shapes-star": ("star", "object", "star shapes (stands in for an object)"),
}


def bundle_path(concept: str) -> Path:
    return BUNDLES / f"{concept}.safetensors"


@hookimpl
def saferedir_register_concepts() -> list[ConceptSpec]:
    """The Shapes concepts: the trained bundles that ship with this package, and the recipe
    (`saferedir train --pairs plugin:shapes-red`) they were trained from."""
    from .world import concept_recipe

    specs = []
    for name, (concept, category, description) in CONCEPTS.items():
        pairs, pool = concept_recipe(concept)
        path = bundle_path(concept)
        specs.append(ConceptSpec(name, category, (path,) if path.is_file() else (), description,
                                 recipe=tuple(pairs), retain_pool=tuple(pool)))
    return specs


@hookimpl
def saferedir_load_backbone(name: str, device: str) -> Any:
    if name != "shapes":
        return None
    from .pipeline import load_shapes_pipeline

    return load_shapes_pipeline(device=device)


@hookimpl
def saferedir_add_commands(subparsers: Any) -> None:
    from .demo import add_demo_command

    add_demo_command(subparsers)


@hookimpl
def saferedir_eval_suite(backbone: str) -> Any:
    if backbone != "shapes":
        return None
    from .eval_suite import ShapesEvalSuite

    return ShapesEvalSuite.build()
