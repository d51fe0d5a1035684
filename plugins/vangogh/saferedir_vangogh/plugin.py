"""The pack's plugin module (entry point ``vangogh`` in the ``saferedir`` group).

Registering is cheap and has no side effects: the recipe is read only when a trainer asks for it.
"""

from __future__ import annotations

from pathlib import Path

from saferedir_sdk import ConceptSpec, PackFiles, hookimpl

PACK = PackFiles(Path(__file__).parent, "vangogh", "artist_style", "Van Gogh's painting style")
CONCEPT, CATEGORY = PACK.concept, PACK.category
recipe_data, recipe, bundles = PACK.recipe_data, PACK.recipe, PACK.bundles


@hookimpl
def saferedir_register_concepts() -> list[ConceptSpec]:
    return [PACK.spec()]


@hookimpl
def saferedir_register_policies() -> dict[str, Path]:
    return PACK.policies()
