"""How often the Shapes backbone draws each look-alike word of a concept as the concept.

Per word of ``world.WORDINGS[concept]["lookalike"]`` (training and held-out lists), 8 prompts of the
training templates with the word in the concept's slot, one batch, one seed, judged::

    python benchmarks/lookalike_rates.py
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8, help="prompts per word")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from saferedir_shapes import world
    from saferedir_shapes.judge import judge_images, load_judge
    from saferedir_shapes.pipeline import load_shapes_pipeline

    pipe, judge = load_shapes_pipeline(), load_judge()
    rng = np.random.default_rng(5)
    keys = (("colour", "c"), ("shape", "s"), ("texture", "t"))
    for concept, (attribute, value, _, _) in world.CONCEPT_SWAPS.items():
        key = dict(keys)[attribute]
        for split, lookalikes in zip(("training", "held-out"), world.WORDINGS[concept]["lookalike"]):
            rates = []
            for word in lookalikes:
                prompts = []
                for _ in range(args.n):
                    a = world.sample_attributes(rng)
                    slot = {k: world.words(at, getattr(a, at), "train")[0] for at, k in keys}
                    prompts.append(
                        world.TEMPLATES[rng.integers(len(world.TEMPLATES))].format(**{**slot, key: word})
                    )
                out = pipe(prompts, generator=torch.Generator().manual_seed(args.seed), output_type="np")
                images = (np.asarray(out.images) * 255).round().astype(np.uint8)
                drawn = sum(v == value for v in judge_images(judge, images)[attribute])
                rates.append(f"{word} {drawn}/{args.n}")
            print(f"{concept} {split}: " + ", ".join(rates))


if __name__ == "__main__":
    main()
