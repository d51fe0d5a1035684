"""saferedir plugin entry point of the Shapes pack: its backbone, its concepts and their recipes,
its demo policy (``shapes:demo``), ``saferedir demo``, and its efficacy suite for the benchmark.

Registration is cheap: nothing heavy is imported and no recipe is built until something asks.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from saferedir_sdk import hookimpl
from saferedir_sdk.concepts import ConceptSpec, OutcomeJudge, Recipe

HERE = Path(__file__).parent
BUNDLES = HERE / "weights"
POLICIES = {"demo": HERE / "policies" / "demo.yaml"}
CONCEPTS = {
    "shapes-red": ("red", "nsfw", "the colour red (stands in for an NSFW attribute)"),
    "shapes-striped": ("striped", "artist_style", "striped texture (stands in for an artist's style)"),
    "shapes-star": ("star", "object", "star shapes (stands in for an object)"),
}


def bundle_path(concept: str) -> Path:
    return BUNDLES / f"{concept}.safetensors"


def recipe(concept: str) -> Recipe:
    """The concept's training recipe (built once per process, on first use)."""
    from .world import cached_recipe

    return cached_recipe(concept)


def outcome(concept: str) -> OutcomeJudge:
    """The Shapes judge as the concept's outcome judge: an image shows ``red`` if the judge reads
    its colour as red (likewise stripes, stars)."""
    from .judge import concept_judge

    return OutcomeJudge(f"shapes-judge:{concept}", concept_judge(concept))


@hookimpl
def saferedir_register_concepts() -> list[ConceptSpec]:
    """The Shapes concepts: the trained bundles that ship with this package, and the recipe
    (``saferedir train --pairs plugin:shapes-red``) they were trained from."""
    specs = []
    for name, (concept, category, description) in CONCEPTS.items():
        path = bundle_path(concept)
        specs.append(
            ConceptSpec(
                name,
                category,
                (path,) if path.is_file() else (),
                description,
                recipe=functools.partial(recipe, concept),
                outcome=functools.partial(outcome, concept),
            )
        )
    return specs


@hookimpl
def saferedir_register_policies() -> dict[str, Path]:
    return dict(POLICIES)


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


@hookimpl(optionalhook=True)
def saferedir_eval_suite(backbone: str) -> Any:
    """The Shapes efficacy suite for ``saferedir eval`` (a hook the benchmark plugin specifies)."""
    if backbone != "shapes":
        return None
    from .eval_suite import ShapesEvalSuite

    return ShapesEvalSuite.build()
