"""Trust before import (issue #14): a plugin distribution that no allow-list permits is never
imported; autoload can be switched off; every audit record names the bundle that enforced each
concept and where it came from.

The test distribution is real installed metadata (a ``.dist-info`` folder on ``sys.path`` with a
``saferedir`` entry point); importing its module writes a marker file, so "never imported" is
seen, not assumed.
"""

from __future__ import annotations

import sys
import types

import pytest
from helpers import FORGET, RETAIN, generate

from saferedir_sdk import ConceptSpec, PluginError, SafeRedirGuard, hookimpl
from saferedir_sdk.cli import main
from saferedir_sdk.plugins import (
    ALLOW_ENV,
    DISABLE_AUTOLOAD_ENV,
    discovered_plugins,
    make_plugin_manager,
    policy_plugin_manager,
    registered_policies,
)
from saferedir_sdk.policy import load_policy

MODULE = "marker_pack_for_tests"


@pytest.fixture
def marker_dist(tmp_path, monkeypatch):
    """An installed distribution ``marker-pack`` 0.1 whose plugin module writes ``marker`` on import."""
    site = tmp_path / "site"
    (site / MODULE).mkdir(parents=True)
    marker = tmp_path / "marker"
    (site / MODULE / "__init__.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "from saferedir_sdk import hookimpl\n"
        "@hookimpl\n"
        "def saferedir_register_policies():\n"
        "    return {}\n"
    )
    info = site / "marker_pack-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: marker-pack\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[saferedir]\nmarker = {MODULE}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    yield marker
    sys.modules.pop(MODULE, None)


def _state(pm, name="marker"):
    (found,) = [d for d in discovered_plugins(pm) if d.name == name]
    return found


def test_without_an_allow_list_the_marker_plugin_is_imported(marker_dist):
    """The control: the marker works, so its absence below means something."""
    pm = make_plugin_manager()
    assert marker_dist.read_text() == "imported" and _state(pm).loaded


def test_a_distribution_not_in_the_environment_allow_list_is_never_imported(marker_dist, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "saferedir-adapters, Saferedir_Shapes")
    pm = make_plugin_manager()
    found = _state(pm)
    assert not found.loaded and "not in SAFEREDIR_PLUGINS" in found.reason
    assert not marker_dist.exists() and MODULE not in sys.modules
    assert _state(pm, "sd").loaded and _state(pm, "shapes").loaded  # names are compared normalised


def test_a_version_pin_that_does_not_match_keeps_the_plugin_out(marker_dist, monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "marker-pack==0.2")
    assert "pins version 0.2, installed is 0.1" in _state(make_plugin_manager()).reason
    assert not marker_dist.exists()
    monkeypatch.setenv(ALLOW_ENV, "marker-pack==0.1")
    assert _state(make_plugin_manager()).loaded and marker_dist.exists()


def test_autoload_can_be_disabled_and_plugins_registered_in_code(
    marker_dist, monkeypatch, write_policy, pipe
):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    pm = make_plugin_manager()
    assert not any(d.loaded for d in discovered_plugins(pm)) and not marker_dist.exists()
    import saferedir_adapters.sd

    pm.register(saferedir_adapters.sd, name="sd")  # explicit registration: what the caller chose
    guard = SafeRedirGuard.from_policy(write_policy(), plugin_manager=pm)
    guard.wrap(pipe)
    generate(pipe)
    assert guard.last_report.outcome == "redirected"


def test_the_policy_allow_list_governs_what_a_guard_imports(marker_dist, write_policy, pipe):
    policy = write_policy(plugins={"allow": ["saferedir-adapters"]})
    guard = SafeRedirGuard.from_policy(policy)
    assert not marker_dist.exists()
    assert "not in policy 'test' plugins.allow" in _state(guard.plugin_manager).reason
    guard.wrap(pipe)  # the allowed adapter is there
    # a manager that already holds a plugin the policy does not allow is refused, naming it
    with pytest.raises(PluginError, match="marker-pack 0.1 is loaded but not in policy 'test' plugins.allow"):
        SafeRedirGuard.from_policy(policy, plugin_manager=make_plugin_manager())


def test_a_policy_that_allows_no_adapter_says_what_was_left_out(marker_dist, write_policy, pipe):
    from saferedir_sdk import AdapterNotFoundError

    guard = SafeRedirGuard.from_policy(write_policy(plugins={"allow": ["marker-pack"]}))
    with pytest.raises(
        AdapterNotFoundError, match=r"saferedir-adapters \(not in policy 'test' plugins.allow"
    ):
        guard.wrap(pipe)


def test_a_malformed_allow_entry_is_a_policy_error(write_policy):
    from saferedir_sdk import PolicyError

    with pytest.raises(PolicyError, match="plugins.allow.0"):
        load_policy(write_policy(plugins={"allow": ["saferedir-adapters>=1"]}))


def test_saferedir_plugins_lists_skipped_distributions_and_why(marker_dist, monkeypatch, capsys):
    import saferedir_sdk.plugins as plugins

    monkeypatch.setenv(ALLOW_ENV, "saferedir-adapters,saferedir-shapes,saferedir-bench")
    monkeypatch.setattr(plugins, "_default", None)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "SKIPPED marker" in out and "marker-pack 0.1" in out and "not in SAFEREDIR_PLUGINS" in out
    assert "loaded  sd" in out
    assert not marker_dist.exists()


def test_a_plugin_that_fails_to_import_is_a_typed_error_naming_it(marker_dist):
    (marker_dist.parent / "site" / MODULE / "__init__.py").write_text("raise RuntimeError('broken pack')\n")
    with pytest.raises(
        PluginError, match=r"plugin 'marker' of marker-pack 0.1 .* failed to import: RuntimeError"
    ):
        make_plugin_manager()


def test_every_record_names_the_bundle_and_where_it_came_from(pipe, write_policy, bundles, audit_records):
    pack = types.ModuleType("acme_concepts")

    @hookimpl
    def saferedir_register_concepts():
        return [ConceptSpec("acme-star", "custom", (bundles["star"],))]

    pack.saferedir_register_concepts = saferedir_register_concepts
    pm = make_plugin_manager(load_entry_points=False)
    import saferedir_adapters.sd

    pm.register(saferedir_adapters.sd, name="sd")
    pm.register(pack, name="acme")
    rules = [
        {"concept": "red", "category": "custom", "redirector": {"path": str(bundles["red"])}},
        {"concept": "star", "category": "custom", "redirector": {"plugin": "acme-star"}},
    ]
    guard = SafeRedirGuard.from_policy(write_policy(rules), plugin_manager=pm)
    guard.wrap(pipe)
    generate(pipe, prompts=[FORGET, RETAIN])
    (record,) = audit_records()
    from saferedir_sdk.bundle import file_sha256

    assert record["bundles"] == [
        {
            "concept": "red",
            "sha256": file_sha256(bundles["red"]),
            "file": "red.safetensors",
            "source": "file",
        },
        {
            "concept": "star",
            "sha256": file_sha256(bundles["star"]),
            "file": "star.safetensors",
            "source": "plugin acme (registered in code)",
        },
    ]


def test_an_installed_pack_is_named_with_its_distribution_and_version():
    from importlib import metadata

    pm = policy_plugin_manager(load_policy(registered_policies(make_plugin_manager())["shapes:demo"]))
    from saferedir_sdk.guard.resolve import resolve_policy

    resolution = resolve_policy(load_policy(registered_policies(pm)["shapes:demo"]), pm)
    version = metadata.version("saferedir-shapes")
    assert {c.source for c in resolution.concepts} == {f"plugin shapes (saferedir-shapes {version})"}
