"""``saferedir`` command line.

The SDK's own commands (validate, policy, plugins, train, bundle, audit) are always there; plugins add
more (the Shapes pack ``demo``, the adapters ``demo-mechanics``, the benchmark ``eval``) through
the ``saferedir_add_commands`` hook. Plugins are imported only for a command that is not the
SDK's own (or for ``saferedir plugins``), so ``validate``, ``policy schema`` and ``--help`` load
no plugin and no model code.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import fields
from importlib import metadata
from pathlib import Path
from typing import Any

from .concepts import CATEGORIES
from .errors import PolicyError, SafeRedirError

CORE_COMMANDS = ("validate", "policy", "plugins", "train", "bundle", "audit")


def _share(name: str) -> Any:
    """An argparse type for one of the trainer's share flags, checked as the trainer checks it
    (``check_shares``): a bad value is a usage error naming the flag, before any model is loaded."""

    def parse(text: str) -> float:
        from .training.fit import check_shares

        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            check_shares(**{name: value})
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{name}: ")) from None
        return value

    return parse


def _cmd_validate(args: argparse.Namespace) -> int:
    from .policy import load_policy

    failed = 0
    for ref in args.files:
        try:
            loaded = load_policy(_policy_path(ref))
        except PolicyError as exc:
            print(f"INVALID {exc}", file=sys.stderr)
            failed += 1
            continue
        policy = loaded.policy
        print(
            f"OK {ref}: policy '{policy.name}' v{policy.version}, {len(policy.concepts)} concept(s), "
            f"fail_mode {policy.fail_mode}, sha256 {loaded.sha256}"
        )
        for rule in policy.effective_rules():
            ref_ = rule.redirector
            source = f"path {ref_.path}" if ref_.path else f"plugin {ref_.plugin}"
            print(
                f"   - {rule.concept} [{rule.category}] {rule.action} threshold={rule.threshold} "
                f"strength={rule.strength} replace_steps={rule.replace_steps} <- {source}"
            )
        if args.check_bundles:
            from .guard import SafeRedirGuard

            try:
                guard = SafeRedirGuard(loaded)
            except SafeRedirError as exc:
                print(f"UNENFORCEABLE {ref}: {exc}", file=sys.stderr)
                failed += 1
                continue
            for entry in guard.fail_open:
                print(f"   ! fail_open {entry['concept']}: {entry['reason']}")
            print(f"   bundles: {len(guard.concepts)} concept(s) loaded")
    return 1 if failed else 0


def _policy_path(ref: str) -> Path:
    """A file path as given; ``PLUGIN:NAME`` only loads plugins when no such file exists."""
    from .policy import POLICY_REF

    if Path(ref).exists() or not POLICY_REF.match(ref):
        return Path(ref)
    from .plugins import default_plugin_manager, resolve_policy_ref

    return resolve_policy_ref(default_plugin_manager(), ref)


def _cmd_schema(args: argparse.Namespace) -> int:
    from .atomic import write_text_atomic
    from .policy import policy_json_schema_text

    text = policy_json_schema_text()
    if args.out:
        write_text_atomic(args.out, text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def _plugin_commands(pm: Any) -> dict[str, list[str]]:
    """Per plugin, the commands it adds (each plugin's hook run against a scratch parser)."""
    commands: dict[str, list[str]] = {}
    for impl in pm.hook.saferedir_add_commands.get_hookimpls():
        scratch = argparse.ArgumentParser().add_subparsers()
        impl.function(subparsers=scratch)
        commands[impl.plugin_name] = sorted(scratch.choices)
    return commands


def _cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import (
        default_plugin_manager,
        describe_plugins,
        discovered_plugins,
        registered_concepts,
        registered_policies,
    )

    pm = default_plugin_manager()
    rows = describe_plugins(pm)
    found = discovered_plugins(pm)
    concepts = registered_concepts(pm)
    policies = registered_policies(pm)
    commands = _plugin_commands(pm)
    if args.json:
        print(
            json.dumps(
                {
                    "discovered": [d.__dict__ for d in found],
                    "plugins": rows,
                    "concepts": {k: [str(p) for p in v.bundles] for k, v in concepts.items()},
                    "policies": {k: str(v) for k, v in policies.items()},
                    "commands": commands,
                },
                indent=2,
            )
        )
        return 0
    print("installed (entry point group 'saferedir'; imported only if allowed):")
    for d in found:
        state = "loaded " if d.loaded else "SKIPPED"
        print(f"  {state} {d.name:<17} {d.distribution + ' ' + d.version:<26} {d.value:<30} {d.reason}")
    if not found:
        print("  none")
    print("registered plugins:")
    for row in rows:
        print(
            f"  {row['name']:<16} {row['module']:<32} {row['distribution']:<28} "
            f"commands: {', '.join(commands.get(row['name'], [])) or '-'}"
        )
    print("concepts:" if concepts else "concepts: none registered")
    for name, spec in sorted(concepts.items()):
        print(f"  {name:<24} [{spec.category}] {len(spec.bundles)} bundle(s)  {spec.description}")
    print(
        "policies (SafeRedirGuard.from_policy(NAME), saferedir validate NAME):"
        if policies
        else "policies: none shipped"
    )
    for name, path in sorted(policies.items()):
        print(f"  {name:<24} {path}")
    return 0


def _cmd_plugins_new(args: argparse.Namespace) -> int:
    from .scaffold import write_pack

    def split(value: str | None, sep: str) -> list[str] | None:
        return None if value is None else [v.strip() for v in value.split(sep) if v.strip()]

    target = write_pack(
        args.name,
        args.dir,
        category=args.category,
        description=args.description,
        words=split(args.words, ",") or [],
        neighbours=split(args.neighbours, ",") or [],
        templates=split(args.templates, "|"),
        pool=split(args.pool, "|"),
    )
    print(f"wrote {target} (pip install -e {target}; its README says how to train a bundle)")
    return 0


def _refine_figures(refine: dict[str, Any]) -> dict[str, Any]:
    """The refinement's figures worth printing: rows, how many redirected images still show the
    concept, and the held-out accuracy on redirected rows before and after."""
    return {
        "steps": refine["steps"],
        "rows": refine["rows"],
        "still_shows": refine["still_shows"],
        **{
            f"heldout_redirected_accuracy_by_t_{when}": refine[when].get("heldout_redirected_accuracy_by_t")
            for when in ("before", "after")
        },
    }


def _cmd_train(args: argparse.Namespace) -> int:
    from .bundle import load_bundle
    from .capacity import Capacity
    from .optional import optional
    from .plugins import default_plugin_manager, load_backbone, not_loaded_note, registered_concepts
    from .training import PromptPairs, TrainConfig, igmu_pairs, load_pairs, train_bundle

    accelerate = optional("accelerate")  # several processes under `accelerate launch`; one without it
    accelerator = accelerate.Accelerator() if accelerate is not None else None
    pm = default_plugin_manager()
    outcome = None
    if args.pairs.startswith("plugin:"):
        name, _, variant = args.pairs.removeprefix("plugin:").partition(":")
        spec = registered_concepts(pm).get(name)
        if spec is None or spec.recipe is None:
            raise SafeRedirError(
                f"{args.pairs}: no loaded plugin registers a concept with a prompt recipe by that name"
                f"{not_loaded_note(pm)}"
            )
        recipe = spec.recipe_named(variant)
        if recipe is None:
            raise SafeRedirError(
                f"{args.pairs}: concept {name!r} has no recipe variant {variant!r}; it has "
                f"{sorted(spec.recipe_variants) or 'none'}"
            )
        pairs_list, pool = recipe()
        pairs = PromptPairs(list(pairs_list), list(pool))
        if spec.outcome is not None and not args.no_outcome_labels:
            outcome = spec.outcome()
    elif args.igmu:
        pairs = igmu_pairs(args.pairs, args.retain_file, args.igmu)
    else:
        pairs = load_pairs(args.pairs)
    if args.outcome is not None:
        if args.no_outcome_labels:
            raise SafeRedirError("--outcome and --no-outcome-labels: give one or the other")
        spec = registered_concepts(pm).get(args.outcome)
        if spec is None or spec.outcome is None:
            raise SafeRedirError(
                f"--outcome {args.outcome}: no loaded plugin registers a concept by that name with an "
                f"outcome judge{not_loaded_note(pm)}"
            )
        outcome = spec.outcome()
    if args.soft_labels and (outcome is None or outcome.soft is None):
        raise SafeRedirError(
            "--soft-labels: the labels are the outcome judge's soft reading, and "
            + (
                "no outcome judge labels this fit (--outcome CONCEPT, or a plugin's recipe)"
                if outcome is None
                else f"the outcome judge {outcome.name!r} has none"
            )
        )
    # every capacity choice has its option but the ensemble's size: a fit trains one classifier
    capacity = Capacity(
        **{f.name: getattr(args, f.name) for f in fields(Capacity) if f.name != "classifier_members"}
    )
    cfg = TrainConfig(
        concept=args.concept,
        category=args.category,
        description=args.description,
        seeds=tuple(args.seeds),
        num_inference_steps=args.sampler_steps,
        guidance_scale=args.guidance,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        capacity=capacity,
        patience=args.patience,
        prompt_dropout=args.prompt_dropout,
        prompt_swap=args.prompt_swap,
        swap_below=args.swap_below,
        renoise=args.renoise,
        classify_below=args.classify_below,
        refine_steps=args.refine_steps,
        refine_below=args.refine_below,
        blends=args.blends,
        blend_weights=tuple(args.blend_weights),
        soft_labels=args.soft_labels,
        trainable=args.trainable,
        average_init=args.average_init,
        pooled=not args.no_pooled,
    )
    init = load_bundle(args.init) if args.init is not None else None
    device = str(accelerator.device) if accelerator is not None else "cpu"
    pipe = load_backbone(pm, args.backbone, device)
    summary = train_bundle(
        pipe,
        pairs,
        cfg,
        args.out,
        cache_dir=None if args.no_cache else Path(args.cache),
        accelerator=accelerator,
        plugin_manager=pm,
        progress=not args.quiet,
        outcome=outcome,
        init=init,
    )
    if accelerator is None or accelerator.is_main_process:
        held = summary["heldout"]
        print(
            json.dumps(
                {
                    "out": str(args.out),
                    "sha256": summary.get("sha256"),
                    "data": summary["data"],
                    "sampler": {
                        "steps": summary["config"]["num_inference_steps"],
                        "guidance": summary["config"]["guidance_scale"],
                    },
                    "heldout_accuracy": held.get("heldout_accuracy"),
                    "heldout_ablation": held.get("heldout_ablation"),
                    "heldout_masked_cosine": held.get("heldout_masked_cosine"),
                    "labels": summary["data"]["labels"],
                    "unsafe_share": summary["data"]["unsafe_share"],
                    "seconds": summary["seconds"],
                    "processes": summary["processes"],
                    **({"refine": _refine_figures(summary["refine"])} if "refine" in summary else {}),
                },
                indent=2,
            )
        )
    return 0


def _cmd_bundle_upgrade(args: argparse.Namespace) -> int:
    from .bundle import upgrade_bundle

    sha = upgrade_bundle(args.old, args.new)
    print(f"wrote {args.new} (format 2, sha256 {sha}) from {args.old}")
    return 0


def _cmd_bundle_ensemble(args: argparse.Namespace) -> int:
    from .bundle import ensemble_bundle

    sha = ensemble_bundle(args.base, args.members, args.out)
    print(
        f"wrote {args.out} (sha256 {sha}): {args.base}'s redirection, deciding by the mean p(unsafe) of "
        f"{1 + len(args.members)} classifiers (its own and those of {', '.join(map(str, args.members))})"
    )
    return 0


def _cmd_bundle_inspect(args: argparse.Namespace) -> int:
    from .bundle import classified_below, load_bundle

    bundle = load_bundle(args.file)
    below = classified_below(bundle)  # also checks an ensemble's record of its members

    def heldout(record: Any) -> dict[str, Any]:
        held = record.get("heldout") if isinstance(record, dict) else None
        return held if isinstance(held, dict) else {}

    held = heldout(bundle.training)
    members = bundle.training["ensemble"]["members"] if bundle.config.capacity.classifier_members > 1 else []
    print(
        json.dumps(
            {
                "file": str(bundle.path),
                "sha256": bundle.sha256,
                "concept": {
                    "name": bundle.concept.name,
                    "category": bundle.concept.category,
                    "description": bundle.concept.description,
                },
                "backbone": bundle.backbone.to_dict(),
                "config": bundle.config.to_dict(),
                # a rule using it may decide only at or below this noise level (its decide_at_t)
                "classify_below": below,
                # an ensemble's: the fit of its redirection and first classifier (each member's below)
                "heldout": {
                    k: held.get(k)
                    for k in (
                        "heldout_accuracy",
                        "heldout_accuracy_by_t",
                        "heldout_ablation",
                        "heldout_masked_cosine",
                    )
                },
                **(
                    {
                        "ensemble_members": [
                            {
                                "sha256": m.get("sha256"),
                                "heldout_accuracy": heldout(m.get("training")).get("heldout_accuracy"),
                            }
                            for m in members
                        ]
                    }
                    if members
                    else {}
                ),
            },
            indent=2,
        )
    )
    return 0


def _installed_plugins() -> str:
    """Installed plugin distributions, read from package metadata (nothing is imported)."""
    names = sorted(
        {f"{ep.name} ({ep.dist.name if ep.dist else '?'})" for ep in metadata.entry_points(group="saferedir")}
    )
    return ", ".join(names) or "none"


def build_parser(*, with_plugins: bool = False) -> argparse.ArgumentParser:
    """The command line; with ``with_plugins`` the installed plugins add their commands."""
    from .capacity import CLASSIFIER_ENCODERS, CLASSIFIER_READS, TRAINABLE, Capacity

    parser = argparse.ArgumentParser(
        prog="saferedir",
        description="SafeRedir policy-driven content safety for diffusers pipelines",
        epilog=f"Installed plugins add more commands (loaded on use; `saferedir plugins` lists them): "
        f"{_installed_plugins()}.",
    )
    parser.add_argument("--version", action="version", version=f"saferedir-sdk {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="check policy files (paths or PLUGIN:NAME) against the schema")
    p.add_argument("files", nargs="+", help="policy YAML files, or policies a plugin ships (shapes:demo)")
    p.add_argument("--check-bundles", action="store_true", help="also load every redirector the policy names")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("policy", help="policy format tools")
    psub = p.add_subparsers(dest="policy_command", required=True)
    ps = psub.add_parser("schema", help="print the policy JSON Schema (for editors)")
    ps.add_argument("--out", help="write to this file instead of stdout")
    ps.set_defaults(func=_cmd_schema)
    pp = psub.add_parser(
        "pin", help="pin every rule's redirector bundle by its sha256 (in place, comments kept; or --out)"
    )
    pp.add_argument("policy", help="the policy file")
    pp.add_argument("--out", help="write the pinned policy here instead of replacing the file")
    pp.set_defaults(func=_cmd_policy_pin)

    p = sub.add_parser(
        "plugins", help="installed plugins (loaded or not, and why): their concepts, policies and commands"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_plugins)
    plsub = p.add_subparsers(dest="plugins_command")
    pn = plsub.add_parser(
        "new", help="write a ready-to-install concept pack saferedir-NAME (plugins/README.md)"
    )
    pn.add_argument("name", help="the concept and plugin name: lowercase, digits, hyphens (acme-logo)")
    pn.add_argument("--dir", type=Path, default=Path("."), help="the folder to write saferedir-NAME into")
    pn.add_argument("--category", default="custom", choices=CATEGORIES)
    pn.add_argument("--description", default="")
    pn.add_argument("--words", required=True, help="comma-separated wordings of the concept (forget side)")
    pn.add_argument(
        "--neighbours", required=True, help="comma-separated benign neighbours, one per word (retain side)"
    )
    pn.add_argument(
        "--templates", help="'|'-separated prompt templates with one {} (default: 8 photo/art ones)"
    )
    pn.add_argument(
        "--pool", help="'|'-separated benign subjects for the retain pool (default: 8 everyday ones)"
    )
    pn.set_defaults(func=_cmd_plugins_new)

    p = sub.add_parser("train", help="train a redirector bundle from prompt pairs on a real pipeline")
    p.add_argument("--backbone", required=True, help="'shapes' (embedded) or a diffusers pipeline folder")
    p.add_argument("--concept", required=True)
    p.add_argument("--category", default="custom", choices=CATEGORIES)
    p.add_argument("--description", default="")
    p.add_argument(
        "--pairs",
        required=True,
        help="pairs file (.jsonl/.json/.csv), IGMU forget file, or plugin:NAME[:VARIANT] (a concept "
        "plugin's recipe, or one of its named variants)",
    )
    p.add_argument(
        "--igmu", metavar="KEY", help="read --pairs/--retain-file as IGMU files and take concept KEY"
    )
    p.add_argument("--retain-file", help="IGMU retain file (with --igmu)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--sampler-steps",
        type=int,
        default=None,
        help="denoising steps per trajectory (default: the pipeline's own; Shapes: 20)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="guidance scale of the trajectories (default: the pipeline's own; Shapes: 1.5)",
    )
    p.add_argument("--steps", type=int, default=1500, help="optimiser steps (early stopping may end sooner)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--hidden-dim", type=int, default=Capacity.hidden_dim)
    p.add_argument("--rank", type=int, default=Capacity.rank, help="rank of the token delta head")
    p.add_argument("--num-heads", type=int, default=Capacity.num_heads)
    p.add_argument(
        "--latent-pool",
        type=int,
        default=Capacity.latent_pool,
        help="the latent is average-pooled to this size before the latent encoder",
    )
    p.add_argument(
        "--latent-layers",
        type=int,
        default=Capacity.latent_layers,
        help="convolutions of the latent encoder (>= 2; each after the second halves the size)",
    )
    p.add_argument(
        "--latent-readout",
        choices=["mean", "mean+max"],
        default=Capacity.latent_readout,
        help="how the latent encoder's map becomes a vector (mean+max also sees a shape's tips, a texture's edges)",
    )
    p.add_argument(
        "--token-layers",
        type=int,
        default=Capacity.token_layers,
        help="self-attention layers over the prompt's tokens (and the copy head); 0: neither",
    )
    p.add_argument(
        "--classifier-reads",
        choices=list(CLASSIFIER_READS),
        default=Capacity.classifier_reads,
        help="what the classifier reads: the latent, timestep and prompt, or the latent and timestep "
        "alone (its decision then follows the image being formed; decide late: decide_at_t)",
    )
    p.add_argument("--patience", type=int, default=5)
    p.add_argument(
        "--prompt-dropout",
        type=_share("prompt_dropout"),
        default=0.3,
        help="share of the classifier's augmented rows whose prompt is replaced by the empty one (0: off)",
    )
    p.add_argument(
        "--prompt-swap",
        type=_share("prompt_swap"),
        default=0.0,
        help="share of the pairs in the late half of the schedule also classified with their prompts "
        "exchanged, each latent keeping its own outcome label, so the image outweighs the words (0: off)",
    )
    p.add_argument(
        "--swap-below",
        type=_share("swap_below"),
        default=0.5,
        help="what --prompt-swap calls late: normalised timesteps below this (0 clean .. 1 noise)",
    )
    p.add_argument(
        "--renoise",
        type=_share("renoise"),
        default=0.0,
        help="share of the training rows whose starting noise is replaced by another recorded "
        "generation's, so a latent classifier cannot learn the generations' noises by heart (0: off)",
    )
    p.add_argument(
        "--classify-below",
        type=_share("classify_below"),
        default=1.0,
        help="with --trainable classifier: train and select the classifier on the rows at normalised "
        "timesteps at or below this only, where the policy decides (its rules' decide_at_t; 1: every row)",
    )
    p.add_argument(
        "--refine-steps",
        type=int,
        default=0,
        help="after the fit, generate the forget prompts again redirected by the fitted redirector, label "
        "those images with the concept's judge, and train this many more steps with them classified too, "
        "so the classifier tells a redirection that cleared the concept from one that did not (0: off)",
    )
    p.add_argument(
        "--refine-below",
        type=_share("refine_below"),
        default=0.5,
        help="the redirected rows --refine-steps classifies: those at normalised timesteps below this "
        "(earlier, a redirected latent has not moved away from its unredirected twin)",
    )
    p.add_argument(
        "--blends",
        type=int,
        default=0,
        metavar="N",
        help="N blends per forget generation: its recorded path mixed step by step with a retain-side "
        "generation's that started from the same noise (its pair's or the pool's) at a weight drawn from "
        "--blend-weights, labelled by the concept's judge on the decoded mix and classified: images on "
        "the boundary between the concept and what is not (needs the concept's outcome judge; 0: off)",
    )
    p.add_argument(
        "--blend-weights",
        type=float,
        nargs=2,
        default=(0.2, 0.8),
        metavar=("LOW", "HIGH"),
        help="the range a blend's partner weight is drawn from, uniformly (default 0.2 0.8)",
    )
    p.add_argument(
        "--soft-labels",
        action="store_true",
        help="label every generation by the outcome judge's soft reading (in [0, 1], above 0.5 where "
        "the image shows the concept) instead of its yes or no: an image the judge barely calls the "
        "concept teaches the classifier where the line runs (needs an outcome judge with one)",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="BUNDLE",
        help="start from this bundle's weights and architecture (with --steps 0: refine it only)",
    )
    p.add_argument(
        "--classifier-encoder",
        choices=list(CLASSIFIER_ENCODERS),
        default=Capacity.classifier_encoder,
        help="the latent encoder the classifier reads: shared with the redirection heads, or its own "
        "(with --classifier-reads latent): then --trainable classifier refits the decision of an --init "
        "bundle without touching its redirection",
    )
    p.add_argument(
        "--trainable",
        choices=TRAINABLE,
        default="all",
        help="redirection: fit only the --init bundle's delta, mask and scale heads; every module its "
        "unsafe score reads stays as it was, so it decides exactly as before. classifier: fit only its "
        "classifier (reading what --classifier-reads and --classifier-encoder say; fresh where they "
        "differ from the bundle's), so it redirects exactly as before",
    )
    p.add_argument(
        "--average-init",
        action="store_true",
        help="after the fit, average every weight with the --init bundle's (a uniform soup of the two; "
        "with --trainable redirection the decision stays the init's): the bundle written, and its "
        "held-out figures, are the average's",
    )
    p.add_argument(
        "--no-pooled",
        action="store_true",
        help="leave the backbone's pooled embedding (SDXL's text_embeds) alone: neither read nor moved",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "saferedir" / "trajectories"))
    p.add_argument("--no-cache", action="store_true")
    p.add_argument(
        "--no-outcome-labels",
        action="store_true",
        help="label trajectories by prompt side even when the concept pack has an outcome judge",
    )
    p.add_argument(
        "--outcome",
        metavar="CONCEPT",
        help="label every trajectory by what its image shows, read by the outcome judge of CONCEPT (a "
        "concept a loaded plugin registers): for a --pairs file, which otherwise is labelled by prompt "
        "side (a plugin's recipe takes its own concept's judge without this)",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "bundle", help="redirector bundle files: inspect, join classifiers, upgrade from format 1"
    )
    bsub = p.add_subparsers(dest="bundle_command", required=True)
    b = bsub.add_parser(
        "inspect", help="print a bundle's concept, backbone, architecture and held-out figures"
    )
    b.add_argument("file", type=Path)
    b.set_defaults(func=_cmd_bundle_inspect)
    b = bsub.add_parser(
        "ensemble",
        help="join other fits' classifiers to a bundle's: it redirects as BASE and decides by the mean "
        "p(unsafe) of all of them",
    )
    b.add_argument("base", type=Path, help="the bundle whose redirection (and first classifier) is kept")
    b.add_argument(
        "members",
        type=Path,
        nargs="+",
        help="bundles of the same concept and architecture whose classifiers join",
    )
    b.add_argument("--out", type=Path, required=True)
    b.set_defaults(func=_cmd_bundle_ensemble)
    b = bsub.add_parser("upgrade", help="convert a format-1 bundle (saferedir-sdk 0.1) to format 2, exactly")
    b.add_argument("old", type=Path)
    b.add_argument("new", type=Path)
    b.set_defaults(func=_cmd_bundle_upgrade)

    p = sub.add_parser("audit", help="audit files: verify their hash chain")
    asub = p.add_subparsers(dest="audit_command", required=True)
    a = asub.add_parser(
        "verify", help="report the first altered, missing, reordered or cut record (exit 1), else OK"
    )
    a.add_argument("files", type=Path, nargs="+")
    a.add_argument("--json", action="store_true", help="one JSON object per file")
    a.set_defaults(func=_cmd_audit_verify)

    if with_plugins:
        from .plugins import default_plugin_manager

        default_plugin_manager().hook.saferedir_add_commands(subparsers=sub)
    return parser


def _cmd_policy_pin(args: argparse.Namespace) -> int:
    """Pin every rule's bundle by sha256, in place (or into ``--out``), comments kept."""
    from .atomic import write_text_atomic
    from .bundle import file_sha256
    from .policy import load_policy, pin_policy_text

    loaded = load_policy(args.policy)
    registry = None
    pins: dict[int, str] = {}
    for i, rule in enumerate(loaded.policy.concepts):
        ref = rule.redirector
        if ref.path is not None:
            path = Path(ref.path) if Path(ref.path).is_absolute() else loaded.folder / ref.path
            if not path.is_file():
                raise SafeRedirError(f"concepts.{i} ({rule.concept}): no bundle file {path} to pin")
            files = [path]
        else:
            if registry is None:
                from .plugins import default_plugin_manager, registered_concepts

                registry = registered_concepts(default_plugin_manager())
            spec = registry.get(str(ref.plugin))
            files = list(spec.bundles) if spec is not None else []
            if len(files) != 1:
                raise SafeRedirError(
                    f"concepts.{i} ({rule.concept}): plugin concept '{ref.plugin}' ships {len(files)} bundles; "
                    "a pin names exactly one (pin by path instead)"
                )
        digest = file_sha256(files[0])
        if ref.sha256 is not None and ref.sha256 != digest:
            raise SafeRedirError(
                f"concepts.{i} ({rule.concept}): pinned to {ref.sha256}, but {files[0]} has {digest}; "
                "remove the old pin first if the new bundle is the one you trust"
            )
        if ref.sha256 is None:
            pins[i] = digest
            print(f"concepts.{i} ({rule.concept}): {files[0]} sha256 {digest}")
    text = pin_policy_text(Path(args.policy).read_text(encoding="utf-8"), pins, args.policy)
    target = Path(args.out) if args.out else Path(args.policy)
    write_text_atomic(target, text)
    print(
        f"{len(pins)} pin(s) written to {target}"
        if pins
        else f"nothing to pin: every rule of {args.policy} has one"
    )
    return 0


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from .audit import verify_audit_file

    status = 0
    for path in args.files:
        if not path.is_file():
            print(f"{path}: FAIL: no such file")
            status = 1
            continue
        result = verify_audit_file(path)
        if args.json:
            print(json.dumps({**result.__dict__, "ok": result.ok}))
        elif result.ok:
            print(
                f"{path}: OK: {result.records} records, chain intact; last seq {result.last_seq} hash "
                f"{result.last_hash} (keep these elsewhere to detect a cut after them)"
            )
        else:
            print(f"{path}: FAIL: {result.problems[0]}")
            for problem in result.problems[1:10]:
                print(f"  also: {problem}")
        if result.unfinished and not args.json:
            print(
                f"  {len(result.unfinished)} call(s) started without a completion record: {result.unfinished[:10]}"
            )
        status |= 0 if result.ok else 1
    return status


def _version() -> str:
    from . import __version__

    return __version__


class _DropThirdPartyNoise(logging.Filter):
    """Drops third-party notices that say nothing about the user's command (transformers' notice
    that torchvision is absent, which importing diffusers triggers, and its weight-loading bars)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def _quiet_third_party() -> None:
    """In the ``saferedir`` process only (never on import of the SDK)."""
    logging.getLogger("transformers.utils.import_utils").addFilter(_DropThirdPartyNoise())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    _quiet_third_party()
    try:
        parser = build_parser(with_plugins=command is not None and command not in CORE_COMMANDS)
        args = parser.parse_args(argv)
        return int(args.func(args))
    except SafeRedirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
