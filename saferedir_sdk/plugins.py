"""The plugin manager: entry-point discovery, adapter lookup, concept registry."""

from __future__ import annotations

from typing import Any

import pluggy

from . import hookspecs
from .adapter import Adapter
from .concepts import ConceptSpec
from .errors import AdapterNotFoundError, PluginError

ENTRY_POINT_GROUP = "saferedir"


def make_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the saferedir hook specifications, and the installed plugins
    (``saferedir`` entry points) registered unless ``load_entry_points`` is False."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


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
            f"plugins installed: {names or 'none'} (first-party adapters: pip install ./adapters)"
        )
    if not isinstance(adapter, Adapter):
        raise PluginError(f"saferedir_make_adapter returned {type(adapter).__name__}, expected a saferedir_sdk.Adapter")
    return adapter


def registered_concepts(pm: pluggy.PluginManager) -> dict[str, ConceptSpec]:
    """All concepts the plugins register, by name. Two plugins registering one name is an error."""
    concepts: dict[str, ConceptSpec] = {}
    for batch in pm.hook.saferedir_register_concepts():
        for spec in batch or []:
            if not isinstance(spec, ConceptSpec):
                raise PluginError(f"saferedir_register_concepts returned {type(spec).__name__}, expected ConceptSpec")
            if spec.name in concepts:
                raise PluginError(f"concept '{spec.name}' is registered by more than one plugin")
            concepts[spec.name] = spec
    return concepts


def describe_plugins(pm: pluggy.PluginManager) -> list[dict[str, str]]:
    """Name, module and distribution of each registered plugin (like ``pytest --trace-config``)."""
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    rows = []
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(id(plugin))
        rows.append(
            {
                "name": name,
                "module": getattr(plugin, "__name__", type(plugin).__name__),
                "distribution": f"{dist.project_name} {dist.version}" if dist is not None else "(registered in code)",
            }
        )
    return rows
