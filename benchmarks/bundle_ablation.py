"""What each shipped Shapes bundle's classifier decides from, on its own recipe's held-out pairs.

Per concept: the recipe its classifier was fitted on last (``train_concepts.sh``: the pack's recipe,
red's "descriptions" variant), split as the bundle's training split it (the held-out fraction and
seed its summary records), the held-out pairs' trajectories (its sampler seeds, the backbone's own
sampler, labelled by the judge; read from the training cache when ``train_concepts.sh`` filled it,
else sampled, about a minute a concept), and :func:`saferedir_sdk.training.classifier_ablation`:
accuracy per timestep quarter with the real inputs, shuffled latents, shuffled prompts (each latent
keeping its label) and the empty prompt::

    python benchmarks/bundle_ablation.py
"""

from __future__ import annotations

import argparse

import torch

#: the recipe variant each concept's shipped classifier was fitted on last (train_concepts.sh; none:
#: the pack's recipe)
CLASSIFIER_RECIPES = {"red": "descriptions"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="*", default=["red", "striped", "star"])
    parser.add_argument(
        "--bundle", default=None, help="a bundle file ({c}: the concept) instead of the shipped one"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from saferedir_shapes.pipeline import load_shapes_pipeline
    from saferedir_shapes.plugin import bundle_path

    from saferedir_sdk.bundle import load_bundle
    from saferedir_sdk.plugins import default_plugin_manager, find_adapter, registered_concepts
    from saferedir_sdk.training import PromptPairs, Trajectories, classifier_ablation
    from saferedir_sdk.training.trainer import DEFAULT_CACHE, TrainConfig, collect

    pm = default_plugin_manager()
    adapter = find_adapter(pm, load_shapes_pipeline())
    neutral = adapter.encode_prompts([""])[0].map(lambda t: t.float().cpu())
    lines = ["| concept | inputs | t 0.00-0.25 | 0.25-0.50 | 0.50-0.75 | 0.75-1.00 |", "| --- " * 6 + "|"]
    for concept in args.concepts:
        path = args.bundle.format(c=concept) if args.bundle else bundle_path(concept, "sd")
        bundle = load_bundle(path)
        trained = bundle.training["config"]  # the split and sampler seeds the bundle was trained with
        cfg = TrainConfig(concept=concept, seeds=tuple(trained["seeds"]), seed=trained["seed"])
        spec = registered_concepts(pm)[f"shapes-{concept}"]
        pairs, pool = spec.recipe_named(CLASSIFIER_RECIPES.get(concept, ""))()  # type: ignore[misc]
        _, held = PromptPairs(list(pairs), list(pool)).split(trained["heldout_fraction"], cfg.seed)
        outcome = spec.outcome()
        sides = [
            collect(
                adapter, [p[i] for p in held.pairs], cfg, kind=kind, cache_dir=DEFAULT_CACHE, outcome=outcome
            )
            for i, kind in ((0, "heldout_forget"), (1, "heldout_retain"))
        ]
        redirector = bundle.redirector.float()
        ablation = classifier_ablation(redirector, Trajectories.concat(sides), neutral=neutral)
        for variant in ("real", "shuffled_latent", "shuffled_prompt", "neutral_prompt"):
            figures = " | ".join(f"{ablation[variant][q]:.3f}" for q in ablation[variant])
            lines.append(f"| {concept} | {variant.replace('_', ' ')} | {figures} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
