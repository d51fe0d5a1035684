"""Hook specifications of the saferedir plugin system (pluggy project name ``"saferedir"``).

Plugins are modules or objects with functions marked ``@hookimpl``. Installed distributions
register them through the ``saferedir`` entry-point group::

    [project.entry-points.saferedir]
    my_concepts = "my_package.saferedir_plugin"

First-party adapters and concept packs use exactly these hooks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .adapter import Adapter
    from .concepts import ConceptSpec
    from .policy import AuditSettings

PROJECT = "saferedir"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def saferedir_make_adapter(pipeline: Any) -> Adapter | None:
    """Called by ``guard.wrap(pipeline)``, newest plugin first, until one answers.

    Return an :class:`~saferedir_sdk.adapter.Adapter` for ``pipeline`` if this plugin knows how to
    guard it, else None.
    """


@hookspec
def saferedir_register_concepts() -> list[ConceptSpec]:
    """Called once when a policy refers to a concept by plugin name (``redirector: {plugin: NAME}``)
    and by ``saferedir plugins``.

    Return the concepts this plugin ships: a list of :class:`~saferedir_sdk.concepts.ConceptSpec`,
    each with its trained bundle files (one per backbone).
    """


@hookspec
def saferedir_audit_sinks(settings: AuditSettings) -> list[Any]:
    """Called when a guard is built. Return callables ``sink(record: dict) -> None`` that receive
    every audit record (after the policy's own sinks), e.g. to forward them to a SIEM.
    """


@hookspec
def saferedir_add_commands(subparsers: Any) -> None:
    """Called when the ``saferedir`` command line is built. Add sub-commands with
    ``subparsers.add_parser(NAME, ...)`` and ``set_defaults(func=callable(args) -> exit code)``.
    The first-party adapters add ``demo`` this way.
    """


@hookspec(firstresult=True)
def saferedir_load_backbone(name: str, device: str) -> Any:
    """Called by ``saferedir train --backbone NAME`` (and ``eval``) when NAME is not a folder on
    disk. Return a ready pipeline for a backbone this plugin ships (e.g. ``"shapes"``), else None.
    """


@hookspec(firstresult=True)
def saferedir_eval_suite(backbone: str) -> Any:
    """Called by ``saferedir eval --backbone NAME``. Return an
    :class:`~saferedir_sdk.evaluation.EvalSuite` (prompt sets per concept, a judge, what each
    alternative needs) for a backbone this plugin can judge, else None.
    """
