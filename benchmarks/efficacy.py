"""Efficacy benchmark on the embedded Shapes backbone: SafeRedir beside the alternatives.

    python benchmarks/efficacy.py [--out bench-out/eval] [--n 48]

The same as ``saferedir eval --backbone shapes --policy policies/demo.yaml`` (see
``saferedir_sdk/evaluation.py`` for the sets, methods and metrics); every extra argument is passed
on. Under ``accelerate launch`` the prompts are split across processes. Writes results.json,
results.md, erasure_vs_fidelity.png and examples.png; needs the bench extra for LEACE and plots
(``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import sys

from saferedir_sdk.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    defaults = {"--backbone": "shapes", "--out": "bench-out/eval", "--policy": "policies/demo.yaml"}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    raise SystemExit(main(["eval", *args]))
