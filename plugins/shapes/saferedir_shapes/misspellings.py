"""Misspelt concept words the Shapes backbone still draws as the concept.

The concept recipes' robustness augmentation labels a forget prompt with a misspelt concept word
unsafe. That label is only true when the backbone still draws the concept: measured, it draws
36-48% of random one-edit misspellings as the concept (most of "rred" comes out purple), and a
latent-aware classifier cannot learn "unsafe" for a trajectory that never becomes the concept.
This script keeps the misspellings that are: each candidate (:func:`world.misspell` of every
single-word training synonym) is drawn in ``--prompts`` training templates, one image each, and
kept when the judge sees the concept in at least ``--keep`` of them. The result, with every
candidate's rate, is ``weights/misspellings.json``, which :func:`world.concept_recipe` reads.

    python -m saferedir_shapes.misspellings
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from saferedir_sdk.atomic import write_text_atomic

from . import world

OUT = Path(__file__).resolve().parent / "weights" / "misspellings.json"


def candidates(concept: str, per_word: int, seed: int) -> dict[str, list[str]]:
    """Up to ``per_word`` distinct misspellings of each single-word training synonym of the concept."""
    attribute, value, _, _ = world.CONCEPT_SWAPS[concept]
    rng = np.random.default_rng(seed)
    out = {}
    for word in (w for w in world.words(attribute, value, "train") if w.isalpha()):
        found: list[str] = []
        for _ in range(10 * per_word):
            m = world.misspell(word, rng)
            if m not in found:
                found.append(m)
            if len(found) == per_word:
                break
        out[word] = found
    return out


def measure(per_word: int = 6, prompts: int = 8, keep: float = 0.75, seed: int = 0) -> dict:
    from .judge import judge_images, load_judge
    from .pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_shapes_pipeline

    pipe, judge = load_shapes_pipeline(), load_judge()
    rng = np.random.default_rng(seed + 1)
    result: dict = {
        "keep": keep,
        "prompts": prompts,
        "steps": DEFAULT_STEPS,
        "guidance": DEFAULT_GUIDANCE,
        "rates": {},
        "kept": {},
    }
    for concept, (attribute, value, _, _) in world.CONCEPT_SWAPS.items():
        for word, variants in candidates(concept, per_word, seed).items():
            for variant in variants:
                texts = []
                for _ in range(prompts):
                    a = world.sample_attributes(rng)
                    a = world.Attributes(**{**a.__dict__, attribute: value})
                    pick = {k: world.words(k, getattr(a, k), "train") for k in ("colour", "shape", "texture")}
                    pick = {k: ws[rng.integers(len(ws))] for k, ws in pick.items()}
                    pick[attribute] = variant
                    template = world.TEMPLATES[rng.integers(len(world.TEMPLATES))]
                    texts.append(template.format(c=pick["colour"], s=pick["shape"], t=pick["texture"]))
                images = pipe(
                    texts,
                    num_inference_steps=DEFAULT_STEPS,
                    guidance_scale=DEFAULT_GUIDANCE,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="np",
                ).images
                labels = judge_images(judge, (images * 255).round().astype(np.uint8))[attribute]
                rate = float(np.mean([label == value for label in labels]))
                result["rates"][variant] = round(rate, 3)
                if rate >= keep:
                    result["kept"].setdefault(word, []).append(variant)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-word", type=int, default=6, help="candidate misspellings per synonym")
    parser.add_argument("--prompts", type=int, default=8, help="images (prompts) per candidate")
    parser.add_argument(
        "--keep", type=float, default=0.75, help="keep a candidate drawn as the concept this often"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    result = measure(args.per_word, args.prompts, args.keep, args.seed)
    write_text_atomic(args.out, json.dumps(result, indent=1, sort_keys=True) + "\n")
    n, kept = len(result["rates"]), sum(len(v) for v in result["kept"].values())
    print(
        f"kept {kept} of {n} misspellings (drawn as the concept in >= {args.keep:.0%} of {args.prompts} images) -> {args.out}"
    )
    for word, variants in sorted(result["kept"].items()):
        print(f"  {word}: {', '.join(variants)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
