"""The guard's own cost per denoising step at SDXL sizes (issue #15), beside an SDXL UNet step.

    python benchmarks/overhead_sdxl.py [--device cuda --dtype fp16]

No pipeline: the real SDXL base UNet architecture (2.6 B parameters, random weights, built from its
config) is timed on one CFG batch (2 x 4 x 128 x 128 latents, 77 x 2048 tokens, pooled 1280 and the
six time ids), and the engine on the inputs an SDXL adapter hands it: two token streams (77 x 768
and 77 x 1280), the pooled embedding (1280) and the 4 x 128 x 128 latent, batch 1, for 1 / 3 / 10 / 30
always-triggered random bundles of the default capacity checked every step. The adapter's split
and merge are left out (0.02 ms at SD 1.5 scale, ``overhead.py``). Prints guard ms per step,
the step ratio, kernels per checked step and memory per concept. An end-to-end SDXL pipeline run
is not part of it: at ~14 GB in fp32 and tens of seconds a step it does not fit these 2 cores' budget.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saferedir_sdk import (
    Conditioning,
    EngineConcept,
    RedirectionEngine,
    Redirector,
    RedirectorConfig,
    TokenStream,
)
from saferedir_sdk.policy import ConceptRule
from saferedir_sdk.stacked import kernel_ops


def timed(fn, device: str, reps: int) -> float:
    values = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        values.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--unet-reps", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # SDXL base's UNet config
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ).to(device, dtype)
    params = sum(p.numel() for p in unet.parameters())
    sample = torch.randn(2, 4, 128, 128, device=device, dtype=dtype)
    added = {
        "text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
        "time_ids": torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, device=device, dtype=dtype),
    }
    hidden = torch.randn(2, 77, 2048, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)

    def unet_step() -> None:
        with torch.no_grad():
            unet(sample, t, encoder_hidden_states=hidden, added_cond_kwargs=added, return_dict=False)

    unet_step()  # warm-up
    unet_ms = timed(unet_step, args.device, args.unet_reps)
    print(
        f"SDXL UNet ({params / 1e9:.2f} B parameters), {args.device} {args.dtype}, {args.threads} threads: {unet_ms:.0f} ms per CFG step",
        flush=True,
    )

    config = RedirectorConfig(
        (TokenStream("text_encoder", 77, 768), TokenStream("text_encoder_2", 77, 1280)), 4, pooled_dim=1280
    )
    cond = Conditioning(
        (
            torch.randn(1, 77, 768, device=device, dtype=dtype),
            torch.randn(1, 77, 1280, device=device, dtype=dtype),
        ),
        torch.randn(1, 1280, device=device, dtype=dtype),
    )
    uncond = cond.map(torch.zeros_like)
    latents, tn = sample[1:], torch.tensor(0.5, device=device)
    print("| concepts | guard ms/step | step ratio | kernels/checked step | MB/concept: stacked weights |")
    print("| --- | --- | --- | --- | --- |")
    for n in (1, 3, 10, 30):
        concepts = []
        for i in range(n):
            torch.manual_seed(100 + i)
            redirector = Redirector(config).eval()
            with torch.no_grad():
                redirector.classifier[-1].bias.fill_(30.0)  # always triggered
            rule = ConceptRule(
                concept=f"c{i}", category="custom", redirector={"path": "x.safetensors"}, replace_steps=0
            )
            concepts.append(EngineConcept(rule, redirector.to(device)))
        engine = RedirectionEngine(concepts)
        state = engine.init_state(cond)

        def step(engine=engine, state=state) -> None:
            engine.step(latents, tn, cond, state, uncond)

        step()
        ms = timed(step, args.device, args.reps)
        kernels = sum(kernel_ops(step).values())
        stack = engine.groups[0].stack
        print(
            f"| {n} | {ms:.2f} | {(unet_ms + ms) / unet_ms:.5f} | {kernels} | {stack.nbytes() / n / 1e6:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
