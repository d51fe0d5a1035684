"""Measure the Shapes backbone with the judge, at the demo's settings, on held-out seeds.

    python -m saferedir_shapes.evaluate [--n 240] [--json results.json]
    python -m saferedir_shapes.evaluate --layout xl [--only tokens|pooled]   # the Shapes-XL variant

Sets: seen phrasings (training vocabulary and pairs), unseen colour-shape pairs, and held-out
synonyms of each attribute. Per set: judge accuracy per attribute, empty images, background
brightness against training renders; and sampling speed (20 steps, batches of 8). ``--only`` (XL):
the UNet reads one conditioning channel, the other replaced by the empty prompt's (``tokens``: the
pooled embedding is the empty prompt's; ``pooled``: the tokens are) - how much of the prompt each
channel draws on its own.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .judge import HEADS, judge_images, load_judge
from .pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_shapes_pipeline
from .text import sentence_embeddings
from .world import (
    COLOUR_WORDS,
    SHAPE_WORDS,
    TEXTURE_WORDS,
    Attributes,
    background_brightness,
    make_prompt,
    render,
    sample_attributes,
)

STEPS = DEFAULT_STEPS
GUIDANCE = DEFAULT_GUIDANCE
EVAL_SEED = 10_000  # held-out seeds: training never uses generator seeds at all; rendering uses 0


def is_empty(img: np.ndarray) -> bool:
    """No shape: fewer than 12 pixels differ clearly (> 60 in some channel) from the border colour."""
    f = img.astype(np.float32)
    border = np.concatenate([f[:2].reshape(-1, 3), f[-2:].reshape(-1, 3)]).mean(axis=0)
    return int((np.abs(f - border).max(axis=2) > 60).sum()) < 12


def prompt_set(name: str, n: int, seed: int) -> tuple[list[str], list[Attributes]]:
    rng = np.random.default_rng(seed)
    split = "heldout_pairs" if name == "unseen_pairs" else "train"
    heldout = {"heldout_colour": "colour", "heldout_shape": "shape", "heldout_texture": "texture"}.get(name)
    attrs = [sample_attributes(rng, split=split) for _ in range(n)]
    return [make_prompt(a, rng, heldout=heldout) for a in attrs], attrs


def _one_channel(pipe: Any, prompts: list[str], only: str) -> dict[str, Any]:
    """Shapes-XL call arguments for ``prompts`` with one channel kept (``tokens`` / ``pooled``) and
    the other the empty prompt's."""
    tokens, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    empty_tokens, _, empty_pooled, _ = pipe.encode_prompt(
        [""] * len(prompts), do_classifier_free_guidance=False
    )
    if only == "tokens":
        return {"prompt_embeds": tokens, "pooled_prompt_embeds": empty_pooled}
    return {"prompt_embeds": empty_tokens, "pooled_prompt_embeds": pooled}


def generate(
    pipe: Any,
    prompts: list[str],
    seed: int,
    batch: int = 8,
    guidance: float = GUIDANCE,
    only: str | None = None,
) -> np.ndarray:
    out = []
    for i in range(0, len(prompts), batch):
        g = torch.Generator().manual_seed(seed + i)
        chunk = prompts[i : i + batch]
        inputs = {"prompt": chunk} if only is None else _one_channel(pipe, chunk, only)
        out.append(
            pipe(
                **inputs, num_inference_steps=STEPS, guidance_scale=guidance, generator=g, output_type="np"
            ).images
        )
    return (np.concatenate(out) * 255).round().astype(np.uint8)


def score(judge: Any, images: np.ndarray, attrs: list[Attributes]) -> dict[str, Any]:
    pred = judge_images(judge, images)
    truth = {
        "colour": [a.colour for a in attrs],
        "shape": [a.shape for a in attrs],
        "texture": [a.texture for a in attrs],
    }
    acc = {k: round(float(np.mean([p == t for p, t in zip(pred[k], truth[k])])), 4) for k in truth}
    return {
        "accuracy": acc,
        "empty": int(sum(is_empty(im) for im in images)),
        "background": round(float(np.mean([background_brightness(im) for im in images])), 4),
        "pred": pred,
    }


def synonym_breakdown(
    pred: dict[str, list[str]],
    prompts: list[str],
    attrs: list[Attributes],
    attribute: str,
    table: dict[str, tuple[list[str], list[str]]],
) -> dict[str, float]:
    """Accuracy per held-out synonym (matched by the word appearing in the prompt)."""
    result = {}
    for value, (_, held) in table.items():
        for word in held:
            hits = [
                pred[attribute][i] == getattr(attrs[i], attribute)
                for i, p in enumerate(prompts)
                if getattr(attrs[i], attribute) == value and word in p
            ]
            if hits:
                result[f"{word} ({value})"] = round(float(np.mean(hits)), 3)
    return result


def nearest_training_word(
    encoder: Any, tokenizer: Any, word: str, attribute: str, table: dict[str, tuple[list[str], list[str]]]
) -> str:
    """MiniLM's nearest training synonym (mean-pooled sentence embedding, cosine) to a held-out word."""
    train = [(w, v) for v, (ws, _) in table.items() for w in ws]
    frame = {"colour": "a {} circle", "shape": "a red {}", "texture": "a {} red circle"}[attribute]
    texts = [frame.format(word)] + [frame.format(w) for w, _ in train]
    pooled = sentence_embeddings(encoder, tokenizer, texts)
    sims = pooled[1:] @ pooled[0]
    best = int(sims.argmax())
    return f"{train[best][0]} ({train[best][1]}, cos {float(sims[best]):.2f})"


def contact_sheet(path: Path, n: int = 80, seed: int = 20_000) -> None:
    """``n`` generated samples (seen and unseen prompts, demo settings, held-out seeds), each with its
    prompt's attributes and the judge's labels, as a PNG grid (8 per row), to compare with one's eye."""
    from PIL import Image, ImageDraw

    prompts, attrs = prompt_set("seen", n // 2, seed=7)
    more, more_attrs = prompt_set("unseen_pairs", n - n // 2, seed=8)
    images = generate(load_shapes_pipeline(), prompts + more, seed)
    labels = judge_images(load_judge(), images)
    cell, cols = 128, 8
    sheet = Image.new("RGB", (cols * (cell + 8), (n // cols) * (cell + 40)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (img, a) in enumerate(zip(images, attrs + more_attrs)):
        x, y = (i % cols) * (cell + 8), (i // cols) * (cell + 40)
        sheet.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST), (x, y))
        judged = f"{labels['colour'][i]} {labels['texture'][i]} {labels['shape'][i]}"
        draw.text((x, y + cell + 2), f"{i}: asked {a.colour[:3]} {a.texture[:3]} {a.shape[:3]}", fill="black")
        ok = judged == f"{a.colour} {a.texture} {a.shape}"
        draw.text((x, y + cell + 16), f"judge {judged}", fill=(0, 110, 0) if ok else (200, 0, 0))
    sheet.save(path)
    everything = attrs + more_attrs
    match = {k: sum(labels[k][i] == getattr(a, k) for i, a in enumerate(everything)) for k in HEADS}
    print(f"wrote {path}: {n} samples; judge label == asked attribute: {match}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=240, help="images per set")
    parser.add_argument("--weights", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)
    parser.add_argument("--layout", choices=["sd", "xl"], default="sd", help="xl: the Shapes-XL variant")
    parser.add_argument(
        "--only",
        choices=["tokens", "pooled"],
        help="xl: condition on one channel (the other: empty prompt's)",
    )
    parser.add_argument(
        "--sets",
        nargs="+",
        default=["seen", "unseen_pairs", "heldout_colour", "heldout_shape", "heldout_texture"],
    )
    parser.add_argument(
        "--no-speed", action="store_true", help="skip the timing (measure it on an idle machine)"
    )
    parser.add_argument(
        "--sheet",
        type=Path,
        help="only write a contact sheet of 80 generated samples with the judge's labels",
    )
    args = parser.parse_args(argv)
    if args.only and args.layout != "xl":
        parser.error("--only needs --layout xl")
    if args.sheet:
        contact_sheet(args.sheet)
        return 0
    pipe = load_shapes_pipeline(args.weights, layout=args.layout)
    judge = load_judge()
    rng = np.random.default_rng(0)
    renders = [render(sample_attributes(rng), rng) for _ in range(500)]
    results: dict[str, Any] = {
        "settings": {
            "steps": STEPS,
            "guidance": args.guidance,
            "n": args.n,
            "layout": args.layout,
            "only": args.only,
        },
        "training_render_background": round(float(np.mean([background_brightness(r) for r in renders])), 4),
    }
    tables = {"colour": COLOUR_WORDS, "shape": SHAPE_WORDS, "texture": TEXTURE_WORDS}
    all_sets = ["seen", "unseen_pairs", "heldout_colour", "heldout_shape", "heldout_texture"]
    for name in args.sets:
        k = all_sets.index(name)
        prompts, attrs = prompt_set(name, args.n, seed=100 + k)
        images = generate(pipe, prompts, EVAL_SEED + 1000 * k, guidance=args.guidance, only=args.only)
        s = score(judge, images, attrs)
        pred = s.pop("pred")
        if name.startswith("heldout_"):
            attribute = name.split("_")[1]
            s["per_synonym"] = synonym_breakdown(pred, prompts, attrs, attribute, tables[attribute])
            s["misses_nearest_training_word"] = {
                w: nearest_training_word(*pipe.minilm(), w.split(" (")[0], attribute, tables[attribute])
                for w, acc in s["per_synonym"].items()
                if acc < 0.7
            }
        results[name] = s
        print(name, json.dumps(s), flush=True)

    if not args.no_speed:
        prompts, _ = prompt_set("seen", 32, seed=999)
        generate(pipe, prompts[:8], 1, guidance=args.guidance)  # warm-up
        t0 = time.perf_counter()
        generate(pipe, prompts, 2, guidance=args.guidance)
        results["seconds_per_image_batch8_20steps"] = round((time.perf_counter() - t0) / len(prompts), 4)
        results["threads"] = torch.get_num_threads()
        print("speed", results["seconds_per_image_batch8_20steps"], "s/image", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
