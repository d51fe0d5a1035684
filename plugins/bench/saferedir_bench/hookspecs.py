"""The benchmark's own hook, added to the plugin manager when the benchmark plugin registers.
Backbone plugins implement it with ``@hookimpl(optionalhook=True)`` so they work without the
benchmark installed."""

from __future__ import annotations

from typing import TYPE_CHECKING

from saferedir_sdk.hookspecs import hookspec

if TYPE_CHECKING:
    from .evaluation import EvalSuite


@hookspec(firstresult=True)
def saferedir_eval_suite(backbone: str, split: str) -> EvalSuite | None:
    """Called by ``saferedir eval --backbone NAME [--split dev]``. Return an
    :class:`~saferedir_bench.evaluation.EvalSuite` (prompt sets per concept, a judge, what each
    alternative needs, a default policy) for a backbone this plugin can judge, else None.
    ``split``: ``"eval"`` (the reported figures) or ``"dev"`` (prompts drawn the same way with
    other draws, for choosing settings: never tune on ``"eval"``) or ``"fresh"`` / ``"fresh2"``
    (hand-written sets in other wordings, each run once; an implementation without one returns None
    for it); an
    implementation that has no dev split may leave the argument out and is then not asked for one.
    """
