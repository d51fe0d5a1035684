"""Kernels per checked step of the engine of any checkout, at SD 1.5 shapes (issue #15's before/after).

    python benchmarks/engine_kernels.py                       # this checkout's engine
    git worktree add /tmp/per-concept 93c80f0                 # the per-concept engine it replaced
    python benchmarks/engine_kernels.py --checkout /tmp/per-concept

Counts, with the profiler on the CPU, the aten ops of one checked ``RedirectionEngine.step`` that
run work (views and allocations left out: ``saferedir_sdk.stacked.METADATA_OPS``, as ``kernel_ops``) for 1, 3,
10 and 30 always-triggered concepts of the default capacity (77x768 tokens, 4x64x64 latents, batch 1).
Uses only the engine API both versions share.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    from saferedir_sdk.stacked import METADATA_OPS  # this checkout's list, then the other's engine

    for name in [m for m in sys.modules if m == "saferedir_sdk" or m.startswith("saferedir_sdk.")]:
        del sys.modules[name]
    sys.path.insert(0, str(args.checkout.resolve()))
    torch.set_num_threads(2)
    import saferedir_sdk.engine as engine_module
    from saferedir_sdk.conditioning import Conditioning, TokenStream
    from saferedir_sdk.policy import ConceptRule
    from saferedir_sdk.redirector import Redirector, RedirectorConfig

    print("engine:", engine_module.__file__)
    config = RedirectorConfig((TokenStream("text_encoder", 77, 768),), 4)
    cond = Conditioning((torch.randn(1, 77, 768),))
    latents, t = torch.randn(1, 4, 64, 64), torch.tensor(0.5)
    for n in (1, 3, 10, 30):
        concepts = [
            engine_module.EngineConcept(
                ConceptRule(
                    concept=f"c{i}",
                    category="custom",
                    redirector={"path": "x.safetensors"},
                    threshold=1e-6,
                    replace_steps=0,
                ),
                Redirector(config).eval(),
            )
            for i in range(n)
        ]
        engine = engine_module.RedirectionEngine(concepts)
        engine.step(latents, t, cond, engine.init_state(cond))  # warm-up
        state = engine.init_state(cond)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            engine.step(latents, t, cond, state)
        kernels = sum(
            e.count for e in prof.key_averages() if e.key.startswith("aten::") and e.key not in METADATA_OPS
        )
        print(f"{n:>3} concepts: {kernels} kernels per checked step")


if __name__ == "__main__":
    main()
