"""How the Shapes judge reads colours off its palette: the measuring instrument's own boundaries.

The judge (plugins/shapes/saferedir_shapes/judge.py) was trained on the six palette colours only;
every image gets one of the six, so a brown, a khaki or a dusty mauve is read as whichever palette
colour the judge finds nearest. Descriptions ("the colour of a horseshoe fresh from the forge") are
drawn in such hues, and the eval counts an image as showing red where the judge reads red. This map
prints the judge's reading (``judge.colour_reading``: its colour probabilities averaged over a
clean plain render of each shape in that colour) over a grid of hues at several saturation/value
levels: the two letters of the likeliest colour, or ``??`` where none reaches ``--sure``;
``--rgb`` reads given colours (e.g. the shape colours ``guarded_wordings.py`` prints for images
that got through)::

    python benchmarks/judge_map.py
    python benchmarks/judge_map.py --rgb 161,103,54 205,88,36
"""

from __future__ import annotations

import argparse
import colorsys

import torch

LEVELS = ((1.0, 0.85), (0.8, 0.85), (0.7, 0.8), (0.6, 0.65), (0.5, 0.55), (0.4, 0.6), (0.3, 0.6), (0.4, 0.45))


def rgb_arg(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and 0 <= int(p) <= 255 for p in parts):
        raise argparse.ArgumentTypeError(f"--rgb: expected R,G,B with each 0..255, got {text!r}")
    r, g, b = (int(p) for p in parts)
    return r, g, b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", type=int, default=15, help="hue step in degrees")
    parser.add_argument("--sure", type=float, default=0.5, help="below this, the cell reads ??")
    parser.add_argument("--rgb", type=rgb_arg, nargs="*", default=[], help="R,G,B colours to read")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from saferedir_shapes.judge import colour_reading, load_judge
    from saferedir_shapes.world import RGB

    judge = load_judge()
    hues = list(range(0, 360, args.step))
    print("the palette:", ", ".join(f"{c} {rgb}" for c, rgb in RGB.items()))
    print(f"\nthe judge's likeliest colour (?? under {args.sure}) by hue (degrees) and saturation,value:\n")
    print("| s,v | " + " | ".join(str(h) for h in hues) + " |")
    print("|---|" + "---|" * len(hues))
    for s, v in LEVELS:
        cells = []
        for h in hues:
            rgb = tuple(255 * x for x in colorsys.hsv_to_rgb(h / 360, s, v))
            reading = colour_reading(judge, rgb)
            colour, p = max(reading.items(), key=lambda kv: kv[1])
            cells.append(colour[:2] if p >= args.sure else "??")
        print(f"| {s:.1f},{v:.2f} | " + " | ".join(cells) + " |")
    for rgb in args.rgb:
        reading = sorted(colour_reading(judge, rgb).items(), key=lambda kv: -kv[1])
        print(f"{rgb}: " + ", ".join(f"{c} {p:.2f}" for c, p in reading))


if __name__ == "__main__":
    main()
