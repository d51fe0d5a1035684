"""Hook specifications of the saferedir plugin system (pluggy project name ``"saferedir"``).

Plugins are modules or objects with functions marked ``@hookimpl``. Installed distributions
register them through the ``saferedir`` entry-point group::

    [project.entry-points.saferedir]
    my_concepts = "my_package.saferedir_plugin"

The entry point's name is the plugin's name (``shapes`` in ``shapes:demo``). First-party adapters,
concept packs and the benchmark use exactly these hooks; a plugin that needs hooks of its own
adds their specifications in :func:`saferedir_add_hookspecs` (as the benchmark adds
``saferedir_eval_suite``), and plugins implementing such an optional hook mark it
``@hookimpl(optionalhook=True)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .adapter import Adapter
    from .concepts import ConceptSpec
    from .policy import AuditSettings

PROJECT = "saferedir"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(historic=True)
def saferedir_add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    """Called once per plugin when it is registered. Add hook specifications of your own with
    ``pluginmanager.add_hookspecs(module)``."""


@hookspec(firstresult=True)
def saferedir_make_adapter(pipeline: Any) -> Adapter | None:
    """Called by ``guard.wrap(pipeline)`` (and by training), newest plugin first, until one answers.

    Return an :class:`~saferedir_sdk.adapter.Adapter` bound to ``pipeline`` if this plugin knows how
    to guard it, else None.
    """


@hookspec(firstresult=True)
def saferedir_load_backbone(name: str, device: str) -> Any:
    """Called by ``saferedir train --backbone NAME`` (and the benchmark) until one answers.

    Return a ready pipeline on ``device`` for ``NAME`` -- a folder this plugin can load (a diffusers
    pipeline folder) or a backbone it ships (``"shapes"``) -- else None.
    """


@hookspec
def saferedir_register_concepts() -> list[ConceptSpec]:
    """Called when a policy refers to a concept by plugin name (``redirector: {plugin: NAME}``),
    by ``saferedir train --pairs plugin:NAME`` and by ``saferedir plugins``.

    Return the concepts this plugin ships: a list of :class:`~saferedir_sdk.concepts.ConceptSpec`,
    each with its trained bundle files (one per backbone). Keep it cheap: build recipes lazily.
    """


@hookspec
def saferedir_register_policies() -> dict[str, Path]:
    """Called when a policy is referred to as ``PLUGIN:NAME`` (``from_policy("shapes:demo")``) and
    by ``saferedir plugins``.

    Return the policy files this plugin ships, by name (``{"demo": Path(...)}``): a policy that
    works wherever the package is installed.
    """


@hookspec
def saferedir_audit_sinks(settings: AuditSettings) -> list[Any]:
    """Called when a guard is built. Return callables ``sink(record: dict) -> None`` that receive
    every audit record (after the policy's own sinks; every event: ``saferedir.call_started``,
    ``saferedir.generation``, ``saferedir.voided``, ``saferedir.unattributed``), e.g. to forward them
    to a SIEM. A sink that raises does not keep the record from the other sinks; under
    ``fail_mode: closed`` it fails the call.
    """


@hookspec
def saferedir_add_commands(subparsers: Any) -> None:
    """Called when the ``saferedir`` command line needs commands beyond the SDK's own (the
    SDK's own commands never load plugins). Add sub-commands with
    ``subparsers.add_parser(NAME, ...)`` and ``set_defaults(func=callable(args) -> exit code)``.
    The Shapes pack adds ``demo`` this way, the benchmark ``eval``.
    """
