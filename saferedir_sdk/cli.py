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


def load_backbone(name: str, device: str = "cpu"):
    """A pipeline from a diffusers folder on disk, or a backbone a plugin ships (``shapes``)."""
    from .plugins import default_plugin_manager

    path = Path(name)
    if path.is_dir():
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    pipe = default_plugin_manager().hook.saferedir_load_backbone(name=name, device=device)
    if pipe is None:
        raise SafeRedirError(f"backbone {name!r}: not a diffusers pipeline folder, and no installed plugin ships it")
    return pipe


def _cmd_train(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    from .plugins import default_plugin_manager, registered_concepts
    from .training import PromptPairs, TrainConfig, igmu_pairs, load_pairs, train_bundle

    accelerator = Accelerator()
    if args.pairs.startswith("plugin:"):
        spec = registered_concepts(default_plugin_manager()).get(args.pairs.removeprefix("plugin:"))
        if spec is None or not spec.recipe:
            raise SafeRedirError(f"{args.pairs}: no installed plugin registers a concept with a prompt recipe by that name")
        pairs = PromptPairs(list(spec.recipe), list(spec.retain_pool))
    elif args.igmu:
        pairs = igmu_pairs(args.pairs, args.retain_file, args.igmu)
    else:
        pairs = load_pairs(args.pairs)
    cfg = TrainConfig(concept=args.concept, category=args.category, description=args.description,
                      seeds=tuple(args.seeds), num_inference_steps=args.sampler_steps, guidance_scale=args.guidance,
                      steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      hidden_dim=args.hidden_dim, rank=args.rank, token_layers=args.token_layers,
                      patience=args.patience)
    pipe = load_backbone(args.backbone, str(accelerator.device))
    summary = train_bundle(pipe, pairs, cfg, args.out, cache_dir=None if args.no_cache else Path(args.cache),
                           accelerator=accelerator, progress=not args.quiet)
    if accelerator.is_main_process:
        held = summary["heldout"]
        print(json.dumps({"out": str(args.out), "sha256": summary.get("sha256"), "data": summary["data"],
                          "heldout_accuracy": held.get("heldout_accuracy"),
                          "heldout_accuracy_by_t": held.get("heldout_accuracy_by_t"),
                          "heldout_masked_cosine": held.get("heldout_masked_cosine"),
                          "seconds": summary["seconds"], "processes": summary["processes"]}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import METHODS, markdown_table, run_eval
    from .plugins import default_plugin_manager

    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        raise SafeRedirError(f"--methods: unknown {unknown}; expected some of {list(METHODS)}")
    pm = default_plugin_manager()
    suite = pm.hook.saferedir_eval_suite(backbone=args.backbone)
    if suite is None:
        raise SafeRedirError(f"backbone {args.backbone!r}: no installed plugin provides an evaluation suite "
                             "(prompt sets and a judge) for it")
    if args.n:
        suite = suite.limited(args.n)
    if args.concepts:
        missing = sorted(set(args.concepts) - {c.name for c in suite.concepts})
        if missing:
            raise SafeRedirError(f"--concepts: {missing} not in the {args.backbone} suite ({[c.name for c in suite.concepts]})")
        suite.concepts = [c for c in suite.concepts if c.name in args.concepts]
    pipe = load_backbone(args.backbone)
    if "saferedir" in args.methods and not args.policy.is_file():
        raise SafeRedirError(f"{args.policy}: policy not found (run from the repository root or pass --policy)")
    results = run_eval(pipe, suite, policy=args.policy, methods=args.methods, out=args.out, batch_size=args.batch_size, seed=args.seed,
                       progress=not args.quiet)
    if results is not None:
        print(markdown_table(results))
        print(json.dumps(results["summary"], indent=2))
        print(f"wrote {args.out}/results.json, results.md, erasure_vs_fidelity.png, examples.png")
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

    p = sub.add_parser("train", help="train a redirector bundle from prompt pairs on a real pipeline")
    p.add_argument("--backbone", required=True, help="'shapes' (embedded) or a diffusers pipeline folder")
    p.add_argument("--concept", required=True)
    p.add_argument("--category", default="custom", choices=["nsfw", "artist_style", "object", "custom"])
    p.add_argument("--description", default="")
    p.add_argument("--pairs", required=True, help="pairs file (.jsonl/.json/.csv), IGMU forget file, or plugin:NAME")
    p.add_argument("--igmu", metavar="KEY", help="read --pairs/--retain-file as IGMU files and take concept KEY")
    p.add_argument("--retain-file", help="IGMU retain file (with --igmu)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sampler-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps (early stopping may end sooner)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-dim", type=int, default=128)
    p.add_argument("--rank", type=int, default=64, help="rank of the token delta head")
    p.add_argument("--token-layers", type=int, default=1,
                   help="self-attention layers over the prompt's tokens (and the copy head); 0: neither")
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "saferedir" / "trajectories"))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="efficacy benchmark: SafeRedir and the alternatives on a backbone's prompt sets")
    p.add_argument("--backbone", default="shapes", help="a backbone whose plugin provides an evaluation suite")
    p.add_argument("--out", type=Path, default=Path("saferedir-eval"))
    p.add_argument("--policy", type=Path, default=Path("policies/demo.yaml"),
                   help="SafeRedir policy; each suite concept is evaluated with its rule alone")
    p.add_argument("--methods", nargs="+", default=["none", "negative_prompt", "sld_medium", "sld_max", "blocklist",
                                                     "leace", "saferedir"])
    p.add_argument("--concepts", nargs="+", help="only these concepts of the suite")
    p.add_argument("--n", type=int, default=0, help="prompts per set (0: the suite's full sets)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=10_000)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_eval)

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
