"""Efficacy benchmark on the embedded Shapes backbone: SafeRedir beside the alternatives.

    python benchmarks/efficacy.py [--out bench-out/eval] [--n 48]

The same as ``saferedir eval --backbone shapes`` (the benchmark plugin, ``plugins/bench``; see
``saferedir_bench/evaluation.py`` for the sets, methods and metrics), with the policy the Shapes
suite names (``shapes:demo``); every extra argument is passed on. Under ``accelerate launch`` the
prompts are split across processes. Writes results.json, results.md, erasure_vs_fidelity.png and
examples.png. Figures: benchmarks/README.md.
"""

from __future__ import annotations

import sys

import torch

from saferedir_sdk.cli import main

if __name__ == "__main__":
    torch.set_num_threads(2)
    args = sys.argv[1:]
    defaults = {"--backbone": "shapes", "--out": "bench-out/eval"}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    raise SystemExit(main(["eval", *args]))
