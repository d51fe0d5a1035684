"""``saferedir`` command line: validate, policy schema, plugins, demo."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PolicyError, SafeRedirError
from .policy import load_policy, policy_json_schema_text


def _cmd_validate(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            loaded = load_policy(path)
        except PolicyError as exc:
            print(f"INVALID {exc}", file=sys.stderr)
            failed += 1
            continue
        policy = loaded.policy
        print(
            f"OK {path}: policy '{policy.name}' v{policy.version}, {len(policy.concepts)} concept(s), "
            f"fail_mode {policy.fail_mode}, sha256 {loaded.sha256}"
        )
        for rule in policy.effective_rules():
            ref = next(c.redirector for c in policy.concepts if c.concept == rule.concept)
            source = f"path {ref.path}" if ref.path else f"plugin {ref.plugin}"
            print(
                f"   - {rule.concept} [{rule.category}] {rule.action} threshold={rule.threshold} "
                f"strength={rule.strength} replace_steps={rule.replace_steps} <- {source}"
            )
        if args.check_bundles:
            from .guard import SafeRedirGuard

            try:
                guard = SafeRedirGuard(loaded)
            except SafeRedirError as exc:
                print(f"UNENFORCEABLE {path}: {exc}", file=sys.stderr)
                failed += 1
                continue
            for entry in guard.fail_open:
                print(f"   ! fail_open {entry['concept']}: {entry['reason']}")
            print(f"   bundles: {len(guard.concepts)} concept(s) loaded")
    return 1 if failed else 0


def _cmd_schema(args: argparse.Namespace) -> int:
    text = policy_json_schema_text()
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import default_plugin_manager, describe_plugins, registered_concepts

    pm = default_plugin_manager()
    rows = describe_plugins(pm)
    concepts = registered_concepts(pm)
    if args.json:
        print(json.dumps({"plugins": rows, "concepts": {k: [str(p) for p in v.bundles] for k, v in concepts.items()}}, indent=2))
        return 0
    print("plugins (entry point group 'saferedir'):")
    for row in rows:
        print(f"  {row['name']:<24} {row['module']:<40} {row['distribution']}")
    print("concepts:" if concepts else "concepts: none registered")
    for name, spec in sorted(concepts.items()):
        print(f"  {name:<24} [{spec.category}] {len(spec.bundles)} bundle(s)  {spec.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saferedir", description="SafeRedir policy-driven content safety for diffusers")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check policy files against the schema")
    p.add_argument("files", nargs="+", help="policy YAML files")
    p.add_argument("--check-bundles", action="store_true", help="also load every redirector the policy names")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("policy", help="policy format tools")
    psub = p.add_subparsers(dest="policy_command", required=True)
    ps = psub.add_parser("schema", help="print the policy JSON Schema (for editors)")
    ps.add_argument("--out", help="write to this file instead of stdout")
    ps.set_defaults(func=_cmd_schema)

    p = sub.add_parser("plugins", help="list installed plugins and the concepts they register")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plugins)

    # plugins add their own commands (the first-party adapters add `demo`), as pytest plugins add options
    from .plugins import default_plugin_manager

    default_plugin_manager().hook.saferedir_add_commands(subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SafeRedirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
