"""The attribute judge: what does an image show (colour, shape, texture)?

Independent of the backbone: trained only on renders with their true labels, with the artefacts
generated images have (tinted and grainy backgrounds, blur, colour shifts) added, never on
generated images. It plays the role NudeNet or a style classifier plays in the paper.

    python -m saferedir_shapes.judge --train        # trains and writes weights/judge.safetensors
    python -m saferedir_shapes.judge --evaluate     # held-out accuracy on fresh renders with artefacts
    python -m saferedir_shapes.evaluate --sheet s.png  # 80 generated samples with the judge's labels, to check by eye
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from .world import COLOURS, SHAPES, TEXTURES, Attributes, add_artefacts, render

WEIGHTS = Path(__file__).parent / "weights" / "judge.safetensors"
HEADS = {"colour": COLOURS, "shape": SHAPES, "texture": TEXTURES}


class Judge(nn.Module):
    """A small CNN with one head per attribute. Input: (N, 3, 32, 32) floats in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            )

        self.features = nn.Sequential(
            block(3, 32),
            nn.MaxPool2d(2),
            block(32, 64),
            nn.MaxPool2d(2),
            block(64, 128),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        return {name: head(h) for name, head in self.heads.items()}


def to_tensor(images: np.ndarray | list) -> torch.Tensor:
    """uint8 (N, 32, 32, 3) or a list of PIL images -> (N, 3, 32, 32) float in [0, 1]."""
    arr = np.stack([np.asarray(im) for im in images]) if isinstance(images, list) else images
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0


def load_judge(path: Path = WEIGHTS) -> Judge:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: judge weights not found (python -m saferedir_shapes.judge --train)")
    judge = Judge()
    judge.load_state_dict(load_file(str(path)), strict=True)
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def judge_images(judge: Judge, images: np.ndarray | list) -> dict[str, list[str]]:
    """Predicted colour, shape and texture names for each image."""
    logits = judge(to_tensor(images))
    return {name: [HEADS[name][i] for i in logits[name].argmax(dim=1).tolist()] for name in HEADS}


@torch.no_grad()
def colour_reading(judge: Judge, rgb: tuple[float, float, float]) -> dict[str, float]:
    """How the judge reads a colour, on or off the palette: its colour probabilities averaged over
    clean renders of that colour, one plain render of each shape (fixed seeds). A colour between
    two palette colours (a vermilion, a khaki) shows where the judge's own boundary lies."""
    images = np.stack(
        [
            render(Attributes(COLOURS[0], shape, "plain"), np.random.default_rng(k), rgb=rgb)
            for k, shape in enumerate(SHAPES)
        ]
    )
    p = torch.softmax(judge(to_tensor(images))["colour"], dim=1).mean(dim=0)
    return dict(zip(COLOURS, p.tolist(), strict=True))


def concept_judge(concept: str, judge: Judge | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, 3) uint8 images -> (N,) bool: which show ``concept`` (a ``CONCEPT_SWAPS`` key);
    ``judge``: the loaded judge to read them with (default: load it)."""
    from .world import CONCEPT_SWAPS

    attribute, value, _, _ = CONCEPT_SWAPS[concept]
    judge = judge or load_judge()

    def shows(images: np.ndarray) -> np.ndarray:
        return np.array([label == value for label in judge_images(judge, images)[attribute]], dtype=bool)

    return shows


def concept_judge_soft(concept: str, judge: Judge | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """(N, H, W, 3) uint8 images -> (N,) floats in [0, 1]: the judge's probability of ``concept``'s
    value against its likeliest rival's, ``p / (p + max other p)`` on its head for that attribute
    (the sigmoid of the two logits' difference). Above 0.5 exactly where :func:`concept_judge` says
    the image shows it (red the likeliest of six); near 0.5 where the judge is torn between red and
    an orange, whatever the other four say."""
    from .world import CONCEPT_SWAPS

    attribute, value, _, _ = CONCEPT_SWAPS[concept]
    index = HEADS[attribute].index(value)
    judge = judge or load_judge()

    def soft(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = judge(to_tensor(images))[attribute].double()
        own = logits[:, index]
        rival = torch.cat([logits[:, :index], logits[:, index + 1 :]], dim=1).max(dim=1).values
        return torch.sigmoid(own - rival).float().numpy()

    return soft


def _dataset(n: int, seed: int, artefacts: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        a = Attributes(COLOURS[rng.integers(6)], SHAPES[rng.integers(5)], TEXTURES[rng.integers(3)])
        img = render(a, rng)
        if rng.random() < artefacts:
            img = add_artefacts(img, rng)
        images.append(img)
        labels.append(a.labels())
    return np.stack(images), np.array(labels)


def evaluate(judge: Judge, n: int = 3000, seed: int = 12345) -> dict[str, float]:
    """Accuracy per attribute on fresh renders (another seed), every one with artefacts."""
    images, labels = _dataset(n, seed, artefacts=1.0)
    with torch.no_grad():
        logits = judge(to_tensor(images))
    return {
        name: round(float((logits[name].argmax(1).numpy() == labels[:, i]).mean()), 4)
        for i, name in enumerate(HEADS)
    }


def train(steps: int = 2500, batch: int = 128, seed: int = 0, pool: int = 30000) -> tuple[Judge, dict]:
    torch.manual_seed(seed)
    start = time.time()
    clean, labels = _dataset(pool, seed, artefacts=0.0)
    rng = np.random.default_rng(seed + 1)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    y = torch.from_numpy(labels)
    for step in range(steps):
        idx = rng.integers(0, pool, batch)
        imgs = np.stack([add_artefacts(clean[i], rng) if rng.random() < 0.8 else clean[i] for i in idx])
        out = judge(to_tensor(imgs))
        loss = sum(F.cross_entropy(out[name], y[idx, i]) for i, name in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 250 == 0:
            print(f"judge step {step + 1}/{steps} loss {float(loss):.4f}", flush=True)
    judge.eval().requires_grad_(False)
    return judge, {
        "steps": steps,
        "batch": batch,
        "seed": seed,
        "pool": pool,
        "minutes": round((time.time() - start) / 60, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Shapes attribute judge")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--evaluate", action="store_true")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--out", type=Path, default=WEIGHTS)
    args = parser.parse_args(argv)
    if args.train:
        judge, info = train(args.steps)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        info["heldout_accuracy_with_artefacts"] = evaluate(judge)
        save_file(
            {k: v.contiguous() for k, v in judge.state_dict().items()},
            str(args.out),
            metadata={"training": json.dumps(info)},
        )
        print(json.dumps(info, indent=2))
    if args.evaluate:
        print(json.dumps(evaluate(load_judge(args.out)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
