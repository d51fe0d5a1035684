"""The pack's own tests: they pass as generated, and keep passing as the pack is curated."""

from __future__ import annotations

from importlib import metadata

import pytest
from saferedir_nudity import plugin

from saferedir_sdk.bundle import load_bundle
from saferedir_sdk.plugins import check_hooks, make_plugin_manager, registered_concepts, registered_policies
from saferedir_sdk.policy import load_policy


def _pm():
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(plugin, name=plugin.CONCEPT)
    check_hooks(pm)  # a misspelt hook name fails here
    return pm


def test_the_pack_registers_its_concept_with_a_recipe():
    spec = registered_concepts(_pm())[plugin.CONCEPT]
    assert spec.category == plugin.CATEGORY and spec.recipe is not None


def test_the_recipe_has_pairs_that_differ_and_a_pool_without_forget_prompts():
    pairs, pool = plugin.recipe()
    assert len(pairs) >= 4 and pool
    assert all(f.strip() and r.strip() and f != r for f, r in pairs)
    assert not {f for f, _ in pairs} & set(pool)


def test_held_out_prompts_never_reach_training():
    data = plugin.recipe_data()
    training = {p for pair in data["pairs"] for p in pair} | set(data["pool"])
    held_out = set(data["held_out"]["forget"]) | set(data["held_out"]["retain"])
    assert held_out and not held_out & training


def test_every_shipped_bundle_loads_and_was_trained_for_this_concept():
    for path in plugin.bundles():
        bundle = load_bundle(path)
        assert (bundle.concept.name, bundle.concept.category) == (plugin.CONCEPT, plugin.CATEGORY), path


def test_the_shipped_policy_validates_and_names_the_concept():
    loaded = load_policy(registered_policies(_pm())[f"{plugin.CONCEPT}:default"])
    assert [r.redirector.plugin for r in loaded.policy.concepts] == [plugin.CONCEPT]


def test_the_installed_entry_point_is_this_plugin():
    found = [ep for ep in metadata.entry_points(group="saferedir") if ep.name == plugin.CONCEPT]
    if not found:
        pytest.skip("the pack is not installed (pip install -e .)")
    assert found[0].value == "saferedir_nudity.plugin"
