"""saferedir plugin entry point of the benchmark: its hook specification and ``saferedir eval``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pluggy

from saferedir_sdk import hookimpl
from saferedir_sdk.errors import SafeRedirError

from .methods import METHODS


@hookimpl
def saferedir_add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    from . import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def _cmd_eval(args: argparse.Namespace) -> int:
    from saferedir_sdk.plugins import default_plugin_manager, load_backbone

    from .evaluation import ablation_table, markdown_table, retain_kinds_table, run_eval

    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SafeRedirError(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
    pm = default_plugin_manager()
    suite = pm.hook.saferedir_eval_suite(backbone=args.backbone, split=args.split)
    if suite is None:
        raise SafeRedirError(
            f"backbone {args.backbone!r}: no installed plugin provides an evaluation suite "
            "(prompt sets and a judge) for it"
        )
    if args.n:
        suite = suite.sized(args.n)
    if args.concepts:
        missing = sorted(set(args.concepts) - {c.name for c in suite.concepts})
        if missing:
            raise SafeRedirError(
                f"--concepts: {missing} not in the {args.backbone} suite ({[c.name for c in suite.concepts]})"
            )
        suite.concepts = [c for c in suite.concepts if c.name in args.concepts]
    pipe = load_backbone(pm, args.backbone)
    results = run_eval(
        pipe,
        suite,
        policy=args.policy,
        methods=args.methods,
        out=args.out,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.quiet,
    )
    if results is not None:
        print(markdown_table(results))
        print(ablation_table(results))
        print(retain_kinds_table(results))
        print(json.dumps(results["summary"], indent=2))
        print(f"wrote {args.out}/results.json, results.md, erasure_vs_fidelity.png, examples.png")
    return 0


@hookimpl
def saferedir_add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="efficacy benchmark: SafeRedir and the alternatives on a backbone's prompt sets"
    )
    p.add_argument(
        "--backbone", default="shapes", help="a backbone whose plugin provides an evaluation suite"
    )
    p.add_argument("--out", type=Path, default=Path("saferedir-eval"))
    p.add_argument(
        "--policy",
        default=None,
        help="SafeRedir policy, a path or PLUGIN:NAME (default: the suite's, shapes:demo for shapes); "
        "each suite concept is evaluated with its rule alone",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--concepts", nargs="+", help="only these concepts of the suite")
    p.add_argument(
        "--n",
        type=int,
        default=0,
        help="prompts per set (0: the suite's own number; the first N of its draws)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument(
        "--split",
        choices=["eval", "dev", "fresh", "fresh2"],
        default="eval",
        help="eval: the suite's reported prompt sets; dev: other draws of the same sets, to choose settings on; "
        "fresh, fresh2: a suite's hand-written sets in other wordings, where it has them",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_eval)
