"""The plugin manager: entry-point discovery, adapter lookup, concept and policy registries,
backbone loading. Plugins are imported only when something asks for them, and only those an
organisation trusts.

Trust before import: discovery reads installed distributions' metadata (``saferedir`` entry
points) without importing anything; a distribution is imported only if every allow-list in force
permits it: ``SAFEREDIR_PLUGINS`` in the environment and, for a guard, the policy's
``plugins.allow`` (``"saferedir-shapes"``, or ``"saferedir-shapes==0.3.0"`` to pin its version).
With no allow-list every installed plugin loads (as pytest's do). ``SAFEREDIR_DISABLE_PLUGIN_AUTOLOAD=1``
loads none: register plugins in code (``pm.register(module, name=...)``) and pass that manager to
``SafeRedirGuard.from_policy(..., plugin_manager=pm)``. ``saferedir plugins`` lists every
discovered distribution, loaded or not, and why.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy

from . import hookspecs
from .adapter import Adapter
from .concepts import ConceptSpec
from .errors import AdapterNotFoundError, PluginError, PolicyError, PolicyIssue
from .policy import POLICY_REF, LoadedPolicy

ENTRY_POINT_GROUP = "saferedir"
ALLOW_ENV = "SAFEREDIR_PLUGINS"
DISABLE_AUTOLOAD_ENV = "SAFEREDIR_DISABLE_PLUGIN_AUTOLOAD"
_ALLOW_ENTRY = re.compile(
    r"^\s*(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:==\s*(?P<version>[A-Za-z0-9.+!_-]+))?\s*$"
)


def normalise_distribution(name: str) -> str:
    """PEP 503 normal form: ``Saferedir_Shapes`` and ``saferedir.shapes`` are ``saferedir-shapes``."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class AllowList:
    """Distributions (optionally pinned to one version) that may be imported as plugins."""

    source: str  # where it came from, for messages: "SAFEREDIR_PLUGINS", "policy 'corp' plugins.allow"
    entries: dict[str, str | None]  # normalised distribution name -> version or None (any)

    @classmethod
    def parse(cls, source: str, items: Iterable[str]) -> AllowList:
        entries: dict[str, str | None] = {}
        for item in items:
            if not item.strip():
                continue
            match = _ALLOW_ENTRY.match(item)
            if match is None:
                raise PluginError(f"{source}: {item!r} is not a distribution name or NAME==VERSION")
            entries[normalise_distribution(match["name"])] = match["version"]
        return cls(source, entries)

    @classmethod
    def from_env(cls) -> AllowList | None:
        value = os.environ.get(ALLOW_ENV)
        return None if value is None else cls.parse(ALLOW_ENV, value.split(","))

    def refusal(self, distribution: str, version: str) -> str | None:
        """Why ``distribution`` ``version`` may not be imported, or None if it may."""
        name = normalise_distribution(distribution)
        if name not in self.entries:
            return f"not in {self.source} ({', '.join(sorted(self.entries)) or 'empty'})"
        wanted = self.entries[name]
        if wanted is not None and wanted != version:
            return f"{self.source} pins version {wanted}, installed is {version}"
        return None


@dataclass(frozen=True)
class DiscoveredPlugin:
    """One ``saferedir`` entry point of an installed distribution, and what became of it."""

    name: str  # the entry point's name = the plugin's name
    value: str  # module (or module:object) it would import
    distribution: str
    version: str
    loaded: bool
    reason: str


def _distributions() -> list[metadata.Distribution]:
    seen: set[str] = set()
    found = []
    for dist in metadata.distributions():
        name = normalise_distribution(dist.metadata["Name"] or "")
        if name and name not in seen:  # the first on sys.path wins, as for imports
            seen.add(name)
            found.append(dist)
    return found


def make_plugin_manager(
    *, load_entry_points: bool = True, allow: Sequence[AllowList] = ()
) -> pluggy.PluginManager:
    """A plugin manager with the saferedir hook specifications and the installed plugins that may be
    imported: every allow-list in ``allow`` and ``SAFEREDIR_PLUGINS`` must permit a distribution
    (none set: all may); none with ``load_entry_points=False`` or ``SAFEREDIR_DISABLE_PLUGIN_AUTOLOAD``
    set. What was discovered, loaded or not and why, is ``discovered_plugins(pm)``. A plugin that
    implements a hook nobody specifies (a misspelt hook name) is an error here, not silence."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.hook.saferedir_add_hookspecs.call_historic(kwargs={"pluginmanager": pm})
    disabled = os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("", "0")
    env = AllowList.from_env()
    lists = [*allow, *([env] if env is not None else [])]
    discovered: list[DiscoveredPlugin] = []
    for dist in _distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            name, version = dist.metadata["Name"], dist.version
            if not load_entry_points or disabled:
                why = (
                    f"{DISABLE_AUTOLOAD_ENV} is set" if disabled else "autoload off (load_entry_points=False)"
                )
                discovered.append(DiscoveredPlugin(ep.name, ep.value, name, version, False, why))
                continue
            refusals = [r for r in (a.refusal(name, version) for a in lists) if r is not None]
            if refusals:
                discovered.append(
                    DiscoveredPlugin(ep.name, ep.value, name, version, False, "; ".join(refusals))
                )
                continue
            if pm.get_plugin(ep.name) is not None:
                discovered.append(
                    DiscoveredPlugin(
                        ep.name, ep.value, name, version, False, "a plugin of that name is already loaded"
                    )
                )
                continue
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin '{ep.name}' of {name} {version} ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
                ) from exc
            pm.register(plugin, name=ep.name)
            why = "allowed by " + ", ".join(a.source for a in lists) if lists else "no allow-list set"
            discovered.append(DiscoveredPlugin(ep.name, ep.value, name, version, True, why))
    pm.saferedir_discovered = discovered  # type: ignore[attr-defined]
    check_hooks(pm)
    return pm


def discovered_plugins(pm: pluggy.PluginManager) -> list[DiscoveredPlugin]:
    """Every installed ``saferedir`` entry point ``pm`` looked at (none for a manager built elsewhere)."""
    return list(getattr(pm, "saferedir_discovered", []))


def plugin_distribution(pm: pluggy.PluginManager, plugin_name: str) -> str:
    """``"DIST VERSION"`` of the loaded plugin ``plugin_name``, or ``"registered in code"``."""
    for found in discovered_plugins(pm):
        if found.loaded and found.name == plugin_name:
            return f"{found.distribution} {found.version}"
    return "registered in code"


def not_loaded_note(pm: pluggy.PluginManager) -> str:
    """For error messages: the installed plugins that were not imported, and why ("" if none)."""
    skipped = [f"{d.distribution} ({d.reason})" for d in discovered_plugins(pm) if not d.loaded]
    return f"; installed but not loaded: {', '.join(skipped)}" if skipped else ""


def check_allowed(pm: pluggy.PluginManager, allow: AllowList) -> None:
    """:class:`PluginError` if ``pm`` holds an entry-point plugin whose distribution ``allow`` does
    not permit (a manager handed to a guard whose policy has its own allow-list). Plugins
    registered in code were chosen by the caller and pass."""
    for found in discovered_plugins(pm):
        if found.loaded and (why := allow.refusal(found.distribution, found.version)) is not None:
            raise PluginError(
                f"plugin '{found.name}' from {found.distribution} {found.version} is loaded but {why}"
            )


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


def policy_plugin_manager(
    loaded: LoadedPolicy, pm: pluggy.PluginManager | None = None
) -> pluggy.PluginManager:
    """The plugin manager a guard of ``loaded`` uses. Without ``plugins.allow`` in the policy:
    ``pm`` or the default one. With it: ``pm`` checked against it (:class:`PluginError` if it holds
    a plugin from a distribution the policy does not allow), or a new manager that imports only
    what the policy (and ``SAFEREDIR_PLUGINS``) allows. Hook names are checked either way."""
    allow = loaded.policy.plugins.allow
    if allow is None:
        pm = pm or default_plugin_manager()
    else:
        allow_list = AllowList.parse(f"policy '{loaded.policy.name}' plugins.allow", allow)
        if pm is None:
            pm = make_plugin_manager(allow=[allow_list])
        else:
            check_allowed(pm, allow_list)
    check_hooks(pm)
    return pm


def find_adapter(pm: pluggy.PluginManager, pipeline: Any) -> Adapter:
    """The adapter of the first plugin that claims ``pipeline``; :class:`AdapterNotFoundError` if none."""
    adapter = pm.hook.saferedir_make_adapter(pipeline=pipeline)
    if adapter is None:
        names = [name for name, _ in pm.list_name_plugin() if name != hookspecs.__name__]
        raise AdapterNotFoundError(
            f"no installed adapter can guard a {type(pipeline).__module__}.{type(pipeline).__name__}; "
            f"plugins loaded: {names or 'none'}{not_loaded_note(pm)} (first-party adapters: pip install "
            "saferedir-adapters)"
        )
    if not isinstance(adapter, Adapter):
        raise PluginError(
            f"saferedir_make_adapter returned {type(adapter).__name__}, expected a saferedir_sdk.Adapter"
        )
    return adapter


def concept_registry(pm: pluggy.PluginManager) -> dict[str, tuple[ConceptSpec, str]]:
    """All concepts the plugins register, by name, with the name of the plugin that registered each.
    Two plugins registering one name is an error."""
    concepts: dict[str, tuple[ConceptSpec, str]] = {}
    for impl in reversed(pm.hook.saferedir_register_concepts.get_hookimpls()):  # pluggy's call order
        for spec in impl.function() or []:
            if not isinstance(spec, ConceptSpec):
                raise PluginError(
                    f"saferedir_register_concepts of plugin '{impl.plugin_name}' returned "
                    f"{type(spec).__name__}, expected ConceptSpec"
                )
            if spec.name in concepts:
                raise PluginError(
                    f"concept '{spec.name}' is registered by more than one plugin "
                    f"('{concepts[spec.name][1]}', '{impl.plugin_name}')"
                )
            concepts[spec.name] = (spec, impl.plugin_name)
    return concepts


def registered_concepts(pm: pluggy.PluginManager) -> dict[str, ConceptSpec]:
    """All concepts the plugins register, by name. Two plugins registering one name is an error."""
    return {name: spec for name, (spec, _) in concept_registry(pm).items()}


def registered_policies(pm: pluggy.PluginManager) -> dict[str, Path]:
    """Every policy the plugins ship, as ``PLUGIN:NAME`` -> file."""
    policies: dict[str, Path] = {}
    for impl in pm.hook.saferedir_register_policies.get_hookimpls():
        for name, path in (impl.function() or {}).items():
            policies[f"{impl.plugin_name}:{name}"] = Path(path)
    return policies


def resolve_policy_ref(pm: pluggy.PluginManager | None, ref: str | Path) -> Path:
    """The policy file ``ref`` names: a path as given, or ``PLUGIN:NAME`` (a policy a plugin ships;
    plugins are consulted only for that form and only when no such file exists; ``pm`` None: the
    default manager, built only then)."""
    if isinstance(ref, Path) or os.path.exists(ref) or not POLICY_REF.match(ref):
        return Path(ref)
    policies = registered_policies(pm or default_plugin_manager())
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
    rows = []
    for name, plugin in pm.list_name_plugin():
        if plugin is hookspecs:
            continue
        module = getattr(plugin, "__name__", type(plugin).__name__)
        rows.append({"name": name, "module": module, "distribution": plugin_distribution(pm, name)})
    return rows
