"""Is one diffusers pipeline object safe to share across threads? (No guard involved.)

    python benchmarks/shared_pipeline_threads.py

A tiny random-weights SD pipeline, 4 threads x 10 calls with mixed step counts (4 / 8) and guidance
(7.5 / 1.0), each compared with the same call made alone. Prints how many calls raised and how
many returned other images than alone: the scheduler (``set_timesteps``) and the pipeline's
per-call attributes (``_guidance_scale``, ...) are shared state. The README's "Threads" note.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from saferedir_adapters.tiny import tiny_sd_pipeline


def main() -> int:
    torch.set_num_threads(2)
    pipe = tiny_sd_pipeline(0)

    def run(i: int, j: int) -> np.ndarray:
        return pipe(
            ["a red circle"],
            num_inference_steps=4 + (i % 2) * 4,
            guidance_scale=1.0 if i % 2 else 7.5,
            output_type="np",
            generator=torch.Generator().manual_seed(j),
        ).images

    alone = {(i, j): run(i, j) for i in range(2) for j in range(10)}
    differing, errors = [0], []

    def work(i: int) -> None:
        for j in range(10):
            try:
                differing[0] += not np.array_equal(run(i, j), alone[(i % 2, j)])
            except Exception as exc:  # noqa: BLE001 - counted and shown
                errors.append(f"{type(exc).__name__}: {exc}"[:100])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(
        f"40 calls on one pipeline from 4 threads: {len(errors)} raised, {differing[0]} returned other images"
    )
    print("first errors:", errors[:2])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
