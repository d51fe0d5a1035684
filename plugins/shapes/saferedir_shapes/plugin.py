"""saferedir plugin entry point of the Shapes pack: its backbones (``shapes``, and ``shapes-xl`` with
SDXL's conditioning layout), their concepts and recipes, the policies ``shapes:demo`` and
``shapes:xl``, ``saferedir demo``, and the efficacy suite of each backbone for the benchmark.

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
POLICIES = {"demo": HERE / "policies" / "demo.yaml", "xl": HERE / "policies" / "xl.yaml"}
CONCEPTS = {
    "shapes-red": ("red", "nsfw", "the colour red (stands in for an NSFW attribute)"),
    "shapes-striped": ("striped", "artist_style", "striped texture (stands in for an artist's style)"),
    "shapes-star": ("star", "object", "star shapes (stands in for an object)"),
}
#: backbone name -> (pipeline layout, prefix of its concepts' names and bundle files)
BACKBONES = {"shapes": ("sd", ""), "shapes-xl": ("xl", "xl-")}
SUITE_POLICIES = {"shapes": "shapes:demo", "shapes-xl": "shapes:xl"}
#: the named recipe variants per concept (world.RECIPE_VARIANTS, named here so registering imports
#: nothing heavy; tests/test_shapes.py checks the two agree)
RECIPE_VARIANT_NAMES = {
    "red": ("descriptions", "wide-descriptions", "orange-target", "yellow-target"),
    "star": ("one-target",),
    "striped": ("wide-pool",),
}


def bundle_path(concept: str, layout: str = "sd") -> Path:
    return BUNDLES / f"{'xl-' if layout == 'xl' else ''}{concept}.safetensors"


def recipe(concept: str, variant: str = "") -> Recipe:
    """The concept's training recipe, or a named variant (built once per process, on first use)."""
    from .world import cached_recipe

    return cached_recipe(concept, variant)


def outcome(concept: str) -> OutcomeJudge:
    """The Shapes judge as the concept's outcome judge: an image shows ``red`` if the judge reads
    its colour as red (likewise stripes, stars); its soft reading is the judge's probability of
    red against its likeliest rival's."""
    from .judge import concept_judge, concept_judge_soft, load_judge

    judge = load_judge()  # one instance read both ways
    return OutcomeJudge(
        f"shapes-judge:{concept}", concept_judge(concept, judge), concept_judge_soft(concept, judge)
    )


@hookimpl
def saferedir_register_concepts() -> list[ConceptSpec]:
    """The Shapes concepts: the trained bundles that ship with this package, and the recipe
    (``saferedir train --pairs plugin:shapes-red``) they were trained from; ``shapes-xl-red`` etc.
    are the same concepts and recipes with bundles for the Shapes-XL backbone."""
    specs = []
    for layout, prefix in BACKBONES.values():
        for name, (concept, category, description) in CONCEPTS.items():
            path = bundle_path(concept, layout)
            specs.append(
                ConceptSpec(
                    name.replace("shapes-", f"shapes-{prefix}", 1),
                    category,
                    (path,) if path.is_file() else (),
                    description + (" - bundle for the Shapes-XL backbone" if prefix else ""),
                    recipe=functools.partial(recipe, concept),
                    outcome=functools.partial(outcome, concept),
                    recipe_variants={
                        v: functools.partial(recipe, concept, v)
                        for v in RECIPE_VARIANT_NAMES.get(concept, ())
                    },
                )
            )
    return specs


@hookimpl
def saferedir_register_policies() -> dict[str, Path]:
    return dict(POLICIES)


@hookimpl
def saferedir_load_backbone(name: str, device: str) -> Any:
    if name not in BACKBONES:
        return None
    from .pipeline import load_shapes_pipeline

    return load_shapes_pipeline(device=device, layout=BACKBONES[name][0])


@hookimpl
def saferedir_add_commands(subparsers: Any) -> None:
    from .demo import add_demo_command

    add_demo_command(subparsers)


@hookimpl(optionalhook=True)
def saferedir_eval_suite(backbone: str, split: str) -> Any:
    """The Shapes efficacy suite for ``saferedir eval`` (a hook the benchmark plugin specifies):
    the same prompt sets and judge on either backbone, each with its own policy. ``split="dev"``:
    the prompt generator's seed 1 instead of 0 (same templates and wording pools, other draws; the
    eval split repeats none of the dev split's first 192 draws per set). ``split="fresh"``: the
    216 hand-written prompts of ``fresh_prompts.py``, run once after every setting was fixed;
    ``split="fresh2"``: the 216 of ``fresh2_prompts.py``, written after ``fresh`` was looked at."""
    if backbone not in BACKBONES:
        return None
    from dataclasses import replace

    from .eval_suite import DEV_SEED, FRESH_SPLITS, ShapesEvalSuite

    fresh = split if split in FRESH_SPLITS else ""
    suite = ShapesEvalSuite.build(seed=DEV_SEED if split == "dev" else 0, fresh=fresh)
    return replace(suite, backbone=backbone, policy=SUITE_POLICIES[backbone])
