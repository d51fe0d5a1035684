"""Does a concept's latent classifier read a colour, or how much of the image has it? At fixed
colours on and off the palette, clean renders of every shape and texture (the Shapes latent is the
patchified image, so a render is the clean latent a generation ends in) are noised to the rule's
deciding checks and read by the bundle's classifier, beside the judge's soft reading of the same
renders (``concept_judge_soft``: p(red) against its likeliest rival). A classifier that reads the
colour moves with the judge; one that reads coloured area falls for the small shapes (triangles,
stars) and the light-patterned textures (stripes, dots) where the judge does not.

    python benchmarks/classifier_area.py                       # red's shipped bundle, checks 16, 18
    python benchmarks/classifier_area.py --bundle CANDIDATE.safetensors --rgb 153,82,66

A diagnostic, not a benchmark of the guard: the renders are not what the backbone draws (no
artefacts), and nothing is chosen on it.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from judge_map import rgb_arg

#: off-palette colours of descriptions that got through the held-out sets (guarded_wordings.py's
#: "its shape's colour"); the palette's red, orange and purple are added from the world's RGB
OFF_PALETTE = (
    ("vermilion", (213, 87, 37)),
    ("red-orange", (207, 85, 29)),
    ("rust", (186, 96, 33)),
    ("brick", (153, 82, 66)),
    ("wine", (138, 66, 75)),
)


def default_colours() -> dict[str, tuple[int, int, int]]:
    """The off-palette colours, then the palette's red, orange and purple."""
    from saferedir_shapes.world import RGB

    return dict(OFF_PALETTE) | {f"palette {c}": RGB[c] for c in ("red", "orange", "purple")}


def readings(
    bundle_path: str | None, colours: dict[str, tuple[int, int, int]], renders: int, steps: tuple[int, ...]
) -> dict[str, dict[tuple[str, str], tuple[float, float]]]:
    """Per colour, per (shape, texture): (the judge's mean soft p(red), the classifier's mean
    p(unsafe) at the lower of the checks ``steps`` of a 20-step call)."""
    from saferedir_shapes.judge import concept_judge_soft, load_judge
    from saferedir_shapes.pipeline import WEIGHTS, load_shapes_pipeline, patchify
    from saferedir_shapes.world import SHAPES, TEXTURES, Attributes, render

    from saferedir_sdk.bundle import load_bundle
    from saferedir_sdk.conditioning import Conditioning

    red = load_bundle(bundle_path or WEIGHTS / "red.safetensors").redirector
    if red.config.capacity.classifier_reads != "latent":
        raise SystemExit(f"{bundle_path}: its classifier reads the prompt too; this reads latent-only ones")
    scheduler = load_shapes_pipeline().scheduler
    scheduler.set_timesteps(20)
    timesteps = [int(scheduler.timesteps[i]) for i in steps]
    soft = concept_judge_soft("red", load_judge())
    noise = torch.Generator().manual_seed(0)
    # the classifier reads the latent and timestep alone: any conditioning of the right shapes
    cond = Conditioning(tuple(torch.zeros(renders, s.seq_len, s.dim) for s in red.config.streams), None)
    out: dict[str, dict[tuple[str, str], tuple[float, float]]] = {}
    for name, rgb in colours.items():
        cells = {}
        for shape in SHAPES:
            for texture in TEXTURES:
                images = np.stack(
                    [
                        render(Attributes("red", shape, texture), np.random.default_rng(1000 + k), rgb=rgb)
                        for k in range(renders)
                    ]
                )
                clean = patchify(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0)
                scores = []
                for t in timesteps:
                    noisy = scheduler.add_noise(
                        clean, torch.randn(clean.shape, generator=noise), torch.tensor([t] * renders)
                    )
                    with torch.no_grad():
                        logit = red(noisy, torch.tensor(t / scheduler.config.num_train_timesteps), cond).logit
                    scores.append(float(torch.sigmoid(logit).mean()))
                cells[(shape, texture)] = (float(soft(images).mean()), min(scores))
        out[name] = cells
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bundle", default=None, help="a red bundle (default: the Shapes pack's shipped one)"
    )
    parser.add_argument(
        "--rgb", nargs="+", type=rgb_arg, default=None, help="R,G,B colours instead of the defaults"
    )
    parser.add_argument("--renders", type=int, default=8, help="renders per shape and texture (seeds 1000..)")
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 18], help="the deciding checks (of 20)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    colours = {",".join(map(str, c)): c for c in args.rgb} if args.rgb else default_colours()
    result = readings(args.bundle, colours, args.renders, tuple(args.steps))
    print(
        f"judge's soft p(red) / classifier p(unsafe) (the lower of steps {args.steps}), mean of "
        f"{args.renders} clean renders a cell noised to those steps, by shape and by texture:\n"
    )
    groups = ("circle", "square", "cross", "star", "triangle", "plain", "dotted", "striped")
    print("| colour | " + " | ".join(groups) + " |")
    print("|---" * (len(groups) + 1) + "|")
    for name, cells in result.items():
        row = []
        for g in groups:
            picked = [v for (shape, texture), v in cells.items() if g in (shape, texture)]
            row.append(f"{np.mean([j for j, _ in picked]):.2f} / {np.mean([c for _, c in picked]):.2f}")
        print(f"| {name} {colours[name]} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
