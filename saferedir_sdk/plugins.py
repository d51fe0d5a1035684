"""The plugin manager: entry-point discovery, adapter lookup, concept and policy registries,
backbone loading. Plugins are imported only when something asks for them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .adapter import Adapter
from .concepts import ConceptSpec
from .errors import AdapterNotFoundError, PluginError, PolicyError, PolicyIssue
from .policy import POLICY_REF

ENTRY_POINT_GROUP = "saferedir"


def make_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the saferedir hook specifications, and the installed plugins
    (``saferedir`` entry points) registered unless ``load_entry_points`` is False. A plugin that
    implements a hook nobody specifies (a misspelt hook name) is an error here, not silence."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.hook.saferedir_add_hookspecs.call_historic(kwargs={"pluginmanager": pm})
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        check_hooks(pm)
    return pm


def check_hooks(pm: pluggy.PluginManager) -> None:
    """:class:`PluginError` naming the plugin and hook if a registered plugin implements a
    ``saferedir_*`` hook that no specification declares (``pm.check_pending()``)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"{exc} (a misspelt hook name?)") from None


_default: pluggy.PluginManager | None = None


def default_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager with every installed plugin (created on first use)."""
    global _default
    if _default is None:
        _default = make_plugin_manager()
    return _default


def find_adapter(pm: pluggy.PluginManager, pipeline: Any) -> Adapter:
    """The adapter of the first plugin that claims ``pipeline``; :class:`AdapterNotFoundError` if none."""
    adapter = pm.hook.saferedir_make_adapter(pipeline=pipeline)
    if adapter is None:
        names = [name for name, _ in pm.list_name_plugin() if name != hookspecs.__name__]
        raise AdapterNotFoundError(
            f"no installed adapter can guard a {type(pipeline).__module__}.{type(pipeline).__name__}; "
            f"plugins installed: {names or 'none'} (first-party adapters: pip install saferedir-adapters)"
        )
    if not isinstance(adapter, Adapter):
        raise PluginError(
            f"saferedir_make_adapter returned {type(adapter).__name__}, expected a saferedir_sdk.Adapter"
        )
    return adapter


def registered_concepts(pm: pluggy.PluginManager) -> dict[str, ConceptSpec]:
    """All concepts the plugins register, by name. Two plugins registering one name is an error."""
    concepts: dict[str, ConceptSpec] = {}
    for batch in pm.hook.saferedir_register_concepts():
        for spec in batch or []:
            if not isinstance(spec, ConceptSpec):
                raise PluginError(
                    f"saferedir_register_concepts returned {type(spec).__name__}, expected ConceptSpec"
                )
            if spec.name in concepts:
                raise PluginError(f"concept '{spec.name}' is registered by more than one plugin")
            concepts[spec.name] = spec
    return concepts


def registered_policies(pm: pluggy.PluginManager) -> dict[str, Path]:
    """Every policy the plugins ship, as ``PLUGIN:NAME`` -> file."""
    policies: dict[str, Path] = {}
    for impl in pm.hook.saferedir_register_policies.get_hookimpls():
        for name, path in (impl.function() or {}).items():
            policies[f"{impl.plugin_name}:{name}"] = Path(path)
    return policies


def resolve_policy_ref(pm: pluggy.PluginManager, ref: str | Path) -> Path:
    """The policy file ``ref`` names: a path as given, or ``PLUGIN:NAME`` (a policy a plugin ships;
    plugins are consulted only for that form and only when no such file exists)."""
    if isinstance(ref, Path) or os.path.exists(ref) or not POLICY_REF.match(ref):
        return Path(ref)
    policies = registered_policies(pm)
    if ref not in policies:
        raise PolicyError(
            ref,
            [
                PolicyIssue(
                    "",
                    f"no such file, and no installed plugin ships a policy '{ref}' "
                    f"(shipped: {sorted(policies) or 'none'})",
                )
            ],
        )
    return policies[ref]


def load_backbone(pm: pluggy.PluginManager, name: str, device: str = "cpu") -> Any:
    """A ready pipeline for ``name``: a folder an installed plugin can load (the adapters load
    diffusers pipeline folders) or a backbone a plugin ships (``shapes``)."""
    pipe = pm.hook.saferedir_load_backbone(name=name, device=device)
    if pipe is None:
        what = (
            "a folder no installed plugin can load"
            if Path(name).is_dir()
            else "not a folder, and no installed plugin ships it"
        )
        raise PluginError(
            f"backbone {name!r}: {what} (first-party loaders: pip install saferedir-adapters saferedir-shapes)"
        )
    return pipe


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, str]]:
    """Name, module and distribution of each registered plugin (like ``pytest --trace-config``)."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is hookspecs:
            continue
        dist = dists.get(id(plugin))
        rows.append(
            {
                "name": name,
                "module": getattr(plugin, "__name__", type(plugin).__name__),
                "distribution": f"{dist.project_name} {dist.version}"
                if dist is not None
                else "(registered in code)",
            }
        )
    return rows
