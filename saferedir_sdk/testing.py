"""The checks every concept pack runs as its own tests. ``saferedir plugins new`` writes a test
module with a ``TestPack(PackChecks)`` class naming the pack's plugin module: the checks pass as
generated and keep passing as the pack is curated; a pack adds its own tests beside them.
Imports pytest only where a check needs it (pytest is the caller's test dependency)."""

from __future__ import annotations

from importlib import metadata
from types import ModuleType
from typing import Any

from .bundle import load_bundle
from .plugins import check_hooks, make_plugin_manager, registered_concepts, registered_policies
from .policy import load_policy


class PackChecks:
    """Subclass as ``class TestPack(PackChecks): plugin = <the pack's plugin module>``; the plugin
    module has ``CONCEPT``, ``CATEGORY``, ``recipe``, ``recipe_data`` and ``bundles`` (as the
    scaffold's does, through :class:`saferedir_sdk.PackFiles`)."""

    plugin: ModuleType

    def _pm(self) -> Any:
        pm = make_plugin_manager(load_entry_points=False)
        pm.register(self.plugin, name=self.plugin.CONCEPT)
        check_hooks(pm)  # a misspelt hook name fails here
        return pm

    def test_the_pack_registers_its_concept_with_a_recipe(self) -> None:
        spec = registered_concepts(self._pm())[self.plugin.CONCEPT]
        assert spec.category == self.plugin.CATEGORY and spec.recipe is not None

    def test_the_recipe_has_pairs_that_differ_and_a_pool_without_forget_prompts(self) -> None:
        pairs, pool = self.plugin.recipe()
        assert len(pairs) >= 4 and pool
        assert all(f.strip() and r.strip() and f != r for f, r in pairs)
        assert not {f for f, _ in pairs} & set(pool)

    def test_held_out_prompts_never_reach_training(self) -> None:
        data = self.plugin.recipe_data()
        training = {p for pair in data["pairs"] for p in pair} | set(data["pool"])
        held_out = set(data["held_out"]["forget"]) | set(data["held_out"]["retain"])
        assert held_out and not held_out & training

    def test_every_shipped_bundle_loads_and_was_trained_for_this_concept(self) -> None:
        for path in self.plugin.bundles():
            bundle = load_bundle(path)
            assert (bundle.concept.name, bundle.concept.category) == (
                self.plugin.CONCEPT,
                self.plugin.CATEGORY,
            ), path

    def test_the_shipped_policy_validates_and_names_the_concept(self) -> None:
        loaded = load_policy(registered_policies(self._pm())[f"{self.plugin.CONCEPT}:default"])
        assert [r.redirector.plugin for r in loaded.policy.concepts] == [self.plugin.CONCEPT]

    def test_the_installed_entry_point_is_this_plugin(self) -> None:
        import pytest

        found = [ep for ep in metadata.entry_points(group="saferedir") if ep.name == self.plugin.CONCEPT]
        if not found:
            pytest.skip("the pack is not installed (pip install -e .)")
        assert found[0].value == self.plugin.__name__
