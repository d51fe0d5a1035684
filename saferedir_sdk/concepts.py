"""Concepts: the category set, what a bundle says it erases, and what concept packs register."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

#: The concept categories, declared once: policies, bundles, packs and the CLI all use these.
Category = Literal["nsfw", "artist_style", "object", "custom"]
CATEGORIES: tuple[str, ...] = get_args(Category)

#: A prompt recipe: forget/retain pairs and an unpaired pool of benign prompts.
Recipe = tuple[list[tuple[str, str]], list[str]]


@dataclass(frozen=True)
class OutcomeJudge:
    """Says which generated images show a concept: a concept pack's measuring instrument (what
    NudeNet is for nudity). Training labels every trajectory by what its image became, not by
    which side of a prompt pair it came from.

    Attributes:
        name: identifies the judge (recorded in bundles and trajectory-cache keys).
        judge: (N, H, W, 3) uint8 images -> (N,) bool, True where the image shows the concept.
        soft: optional (N, H, W, 3) uint8 images -> (N,) floats in [0, 1]: how far each image lies
            on the concept's side of the judge's line, above 0.5 exactly where ``judge`` says True
            (the Shapes judge: its probability of the concept against its likeliest rival's). With
            it, training can take the judge's doubt as the label (``saferedir train --soft-labels``):
            an image the judge barely calls the concept teaches "just over the line", not "sure".
    """

    name: str
    judge: Callable[[Any], Any]
    soft: Callable[[Any], Any] | None = None

    def __call__(self, images: Any) -> Any:
        return self.judge(images)

    def softened(self) -> OutcomeJudge:
        """This judge with its ``soft`` reading as the verdict (named ``NAME:soft``, so recordings
        labelled by it never share a cache key with the hard ones); ``ValueError`` where it has none."""
        if self.soft is None:
            raise ValueError(f"outcome judge {self.name!r}: it has no soft reading (OutcomeJudge.soft)")
        return OutcomeJudge(f"{self.name}:soft", self.soft)


def check_category(category: object) -> str:
    """``category`` if it is one of :data:`CATEGORIES`, else ``ValueError`` listing them."""
    if category not in CATEGORIES:
        raise ValueError(f"concept category must be one of {CATEGORIES}, got {category!r}")
    return category  # type: ignore[return-value]


@dataclass(frozen=True)
class ConceptInfo:
    """The concept a redirector erases (stored in its bundle)."""

    name: str
    category: str
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"concept name must be a non-empty string, got {self.name!r}")
        check_category(self.category)
        if not isinstance(self.description, str):
            raise ValueError(f"concept description must be a string, got {self.description!r}")


@dataclass(frozen=True)
class ConceptSpec:
    """A concept a plugin ships.

    Attributes:
        name: the name policies use (``redirector: {plugin: NAME}``).
        category: one of :data:`CATEGORIES`.
        bundles: trained bundle files, typically one per backbone; the guard uses the one whose
            backbone fingerprint matches the wrapped pipeline.
        description: one line for ``saferedir plugins``.
        recipe: optional zero-argument callable returning the forget/retain prompt pairs and a
            pool of benign prompts that a trainer can use for a new backbone
            (``saferedir train --pairs plugin:NAME``). Called only when a recipe is wanted, so
            registering a concept costs nothing.
        outcome: optional zero-argument callable returning the concept's :class:`OutcomeJudge`;
            with it, ``saferedir train --pairs plugin:NAME`` labels trajectories by outcome.
        recipe_variants: other recipes of the concept by name, each like ``recipe``
            (``saferedir train --pairs plugin:NAME:VARIANT``): e.g. the pairs one stage of a
            bundle's training is fitted on.
    """

    name: str
    category: str
    bundles: tuple[Path, ...]
    description: str = ""
    recipe: Callable[[], Recipe] | None = None
    outcome: Callable[[], OutcomeJudge] | None = None
    recipe_variants: Mapping[str, Callable[[], Recipe]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_category(self.category)

    def recipe_named(self, variant: str = "") -> Callable[[], Recipe] | None:
        """The recipe (``variant`` "") or the named variant; None where there is none by that name."""
        return self.recipe if not variant else self.recipe_variants.get(variant)


@dataclass(frozen=True)
class PackFiles:
    """A concept pack laid out as ``saferedir plugins new`` writes it: ``recipe.json`` (``pairs``,
    ``pool``, ``held_out``), ``bundles/*.safetensors`` and ``policies/*.yaml`` in ``folder``. A
    pack's plugin module builds one and answers its hooks with it; nothing is read until asked.
    """

    folder: Path
    concept: str
    category: str
    description: str = ""
    _recipe: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def recipe_data(self) -> dict[str, Any]:
        """recipe.json: training ``pairs`` [forget, retain], benign ``pool``, ``held_out`` prompts."""
        if not self._recipe:
            self._recipe.update(json.loads((self.folder / "recipe.json").read_text(encoding="utf-8")))
        return self._recipe

    def recipe(self) -> Recipe:
        """What ``saferedir train --pairs plugin:CONCEPT`` trains on (never the held-out prompts)."""
        data = self.recipe_data()
        return [(f, r) for f, r in data["pairs"]], list(data["pool"])

    def bundles(self) -> tuple[Path, ...]:
        """The trained bundles the pack ships, one per backbone."""
        return tuple(sorted((self.folder / "bundles").glob("*.safetensors")))

    def spec(self) -> ConceptSpec:
        """What the pack's ``saferedir_register_concepts`` returns."""
        return ConceptSpec(self.concept, self.category, self.bundles(), self.description, recipe=self.recipe)

    def policies(self) -> dict[str, Path]:
        """What its ``saferedir_register_policies`` returns: ``{name: file}`` per ``policies/NAME.yaml``."""
        return {p.stem: p for p in sorted((self.folder / "policies").glob("*.yaml"))}
