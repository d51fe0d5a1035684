"""The plugin system: concept packs, adapter lookup and audit sinks through pluggy hooks."""

from __future__ import annotations

import types

import pytest
from helpers import FORGET, RETAIN, generate

from saferedir_sdk import (
    AdapterNotFoundError,
    ConceptSpec,
    GuardBuildError,
    PluginError,
    SafeRedirGuard,
    hookimpl,
)
from saferedir_sdk.cli import main
from saferedir_sdk.plugins import check_hooks, describe_plugins, make_plugin_manager, registered_concepts


def concept_pack(bundles):
    """A third-party concept pack, exactly as an installed distribution's entry point would provide it."""
    pack = types.ModuleType("acme_concepts")

    @hookimpl
    def saferedir_register_concepts():
        return [ConceptSpec("acme-red", "custom", (bundles["red"],), "red things, acme's way")]

    pack.saferedir_register_concepts = saferedir_register_concepts
    return pack


def test_entry_points_register_the_first_party_adapter():
    pm = make_plugin_manager()
    rows = {row["name"]: row for row in describe_plugins(pm)}
    assert rows["sd"]["distribution"].startswith("saferedir-adapters")


def test_policy_can_name_a_concept_from_a_plugin(pipe, write_policy, bundles, audit_records):
    pm = make_plugin_manager()
    pm.register(concept_pack(bundles), name="acme")
    assert "acme-red" in registered_concepts(pm)
    policy = write_policy([{"concept": "red", "category": "custom", "redirector": {"plugin": "acme-red"}}])
    guard = SafeRedirGuard.from_policy(policy, plugin_manager=pm)
    guard.wrap(pipe)
    generate(pipe, prompts=[FORGET, RETAIN])
    assert [s.action for s in guard.last_report.samples] == ["redirected", "none"]


def test_unknown_plugin_concept_fails_closed(write_policy):
    policy = write_policy([{"concept": "x", "category": "custom", "redirector": {"plugin": "not-installed"}}])
    with pytest.raises(GuardBuildError, match="no loaded plugin registers concept 'not-installed'"):
        SafeRedirGuard.from_policy(policy, plugin_manager=make_plugin_manager())


def test_plugin_audit_sink_receives_every_record(pipe, write_policy):
    received = []
    sink_plugin = types.ModuleType("siem")

    @hookimpl
    def saferedir_audit_sinks(settings):
        return [received.append]

    sink_plugin.saferedir_audit_sinks = saferedir_audit_sinks
    pm = make_plugin_manager()
    pm.register(sink_plugin, name="siem")
    guard = SafeRedirGuard.from_policy(write_policy(), plugin_manager=pm)
    guard.wrap(pipe)
    generate(pipe)
    generate(pipe, prompts=[RETAIN])
    assert [r["event"] for r in received] == ["saferedir.call_started", "saferedir.generation"] * 2
    received = [r for r in received if r["event"] == "saferedir.generation"]
    assert [r["outcome"] for r in received] == ["redirected", "ok"]
    assert received[0]["request_id"] != received[1]["request_id"]


def test_pipeline_without_adapter_is_a_typed_error(write_policy):
    guard = SafeRedirGuard.from_policy(write_policy())

    class NotAPipeline:
        pass

    with pytest.raises(AdapterNotFoundError, match="NotAPipeline"):
        guard.wrap(NotAPipeline())


def test_cli_lists_plugins_with_their_concepts_policies_and_commands(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "saferedir_adapters.sd" in out and "saferedir-adapters" in out
    assert "shapes-red" in out and "shapes:demo" in out
    assert "commands: demo" in out and "commands: eval" in out


def test_a_misspelt_hook_is_an_error_not_silence():
    typo = types.ModuleType("typo_pack")

    @hookimpl
    def saferedir_register_concept():  # the hook is saferedir_register_concepts
        return []

    typo.saferedir_register_concept = saferedir_register_concept
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(typo, name="typo")
    with pytest.raises(PluginError, match="saferedir_register_concept"):
        check_hooks(pm)


def test_registering_a_concept_pack_builds_no_recipe():
    """Building a guard or listing plugins asks packs for their concepts; recipes stay unbuilt
    until training asks for one."""
    from saferedir_shapes import world

    world.cached_recipe.cache_clear()
    specs = registered_concepts(make_plugin_manager())
    assert world.cached_recipe.cache_info().currsize == 0
    pairs, pool = specs["shapes-red"].recipe()
    assert len(pairs) == 300 and len(pool) == 150 and world.cached_recipe.cache_info().currsize == 1


def test_plugins_leave_the_process_environment_alone():
    import os

    before = dict(os.environ)
    pm = make_plugin_manager()
    registered_concepts(pm)
    SafeRedirGuard.from_policy("shapes:demo", plugin_manager=pm)
    assert dict(os.environ) == before
