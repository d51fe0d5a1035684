"""Train the Shapes backbone's UNet (seeded, reproducible, CPU-friendly).

    python -m saferedir_shapes.train_backbone --steps 8000 --out plugins/shapes/saferedir_shapes/weights
    python -m saferedir_shapes.train_backbone --layout xl --init plugins/shapes/saferedir_shapes/weights/shapes-unet.safetensors \
        --steps 1500 --lr 2e-4 --added-lr-scale 10 --token-dropout 0.3 --pooled-dropout 0.1   # Shapes-XL

Data: a pool of renders of training attributes (held-out colour-shape pairs excluded) with one
training-vocabulary prompt each, encoded once by MiniLM. Objective: v-prediction on a cosine
schedule, 10% classifier-free-guidance dropout (empty prompt), AdamW with warm-up and cosine
decay, EMA of the weights (what ships). Writes ``shapes-unet.safetensors`` (EMA, fp16) and
``shapes-unet.json`` (command, time, losses) atomically, every ``--ckpt-every`` steps and at the end.

``--layout xl`` trains the Shapes-XL variant (SDXL's conditioning layout: the UNet also reads the
prompt's pooled sentence embedding and SDXL's time ids through ``add_embedding``) and writes
``shapes-xl-unet.*``. Started from the SD-layout weights (``--init``), the new ``add_embedding``
layers start at zero output, so step 0 draws exactly as the SD-layout backbone. Besides the 10%
where both are dropped (CFG), ``--token-dropout`` of the batch sees empty-prompt tokens with the
real pooled embedding and ``--pooled-dropout`` the real tokens with the empty prompt's pooled
embedding: the pooled embedding alone must draw the prompt, as SDXL's pooled text embedding
carries content of its own (what makes redirecting it a question worth measuring).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from safetensors.torch import save_file

from saferedir_sdk.atomic import atomic_path, write_text_atomic

from .pipeline import SCHEDULER_CONFIG, TIME_IDS, WEIGHT_FILES, new_unet, patchify
from .text import encode_text_pooled, load_text_encoder
from .world import make_prompt, render, sample_attributes


def build_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng, split="train") for _ in range(n)]
    images = np.stack([render(a, rng) for a in attrs])
    prompts = [make_prompt(a, rng, split="train") for a in attrs]
    labels = np.array([a.labels() for a in attrs])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return patchify(x), prompts, labels


def initial_unet(layout: str, init: Path | None) -> torch.nn.Module:
    """The UNet training starts from: fresh, or ``init``'s weights. An XL UNet started from
    SD-layout weights gets its ``add_embedding`` output layer zeroed, so it starts out drawing
    exactly as the SD-layout backbone (the added conditioning adds nothing until trained)."""
    unet = new_unet(layout)
    if init is None:
        return unet
    from safetensors.torch import load_file

    result = unet.load_state_dict(
        {k: v.float() for k, v in load_file(str(init)).items()}, strict=layout != "xl"
    )
    new = [k for k in result.missing_keys if not k.startswith("add_embedding.")]
    if result.unexpected_keys or new:
        raise SystemExit(f"{init}: not Shapes UNet weights ({new or result.unexpected_keys})")
    if result.missing_keys:
        torch.nn.init.zeros_(unet.add_embedding.linear_2.weight)
        torch.nn.init.zeros_(unet.add_embedding.linear_2.bias)
    return unet


def save_atomic(state: dict[str, torch.Tensor], record: dict, out: Path, layout: str = "sd") -> None:
    name = WEIGHT_FILES[layout]
    with atomic_path(out / name) as tmp:
        save_file(state, str(tmp))
    write_text_atomic(out / name.replace(".safetensors", ".json"), json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--pool", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--cfg-dropout", type=float, default=0.1)
    parser.add_argument("--layout", choices=["sd", "xl"], default="sd")
    parser.add_argument(
        "--added-lr-scale",
        type=float,
        default=1.0,
        help="xl: the added conditioning (add_embedding, new when started from SD weights) learns at this multiple of --lr",
    )
    parser.add_argument(
        "--token-dropout", type=float, default=0.0, help="xl: share with empty tokens, real pooled embedding"
    )
    parser.add_argument(
        "--pooled-dropout", type=float, default=0.0, help="xl: share with real tokens, empty pooled embedding"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--ckpt-every", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "weights")
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from these UNet weights (e.g. the shipped EMA checkpoint) instead of random",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.time()

    encoder, tokenizer = load_text_encoder()
    x0_pool, prompts, _ = build_pool(args.pool, args.seed)
    encoded = [
        encode_text_pooled(encoder, tokenizer, prompts[i : i + 512]) for i in range(0, len(prompts), 512)
    ]
    embeds = torch.cat([states.half() for states, _ in encoded])
    pooled_pool = torch.cat([pooled.half() for _, pooled in encoded])
    empty_states, empty_pooled = encode_text_pooled(encoder, tokenizer, [""])
    empty, empty_pool = empty_states[0], empty_pooled[0]
    xl = args.layout == "xl"
    print(f"pool: {len(prompts)} renders + prompts encoded in {time.time() - start:.0f} s", flush=True)

    unet = initial_unet(args.layout, args.init).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    added = [p for n, p in unet.named_parameters() if n.startswith("add_embedding.")]
    rest = [p for n, p in unet.named_parameters() if not n.startswith("add_embedding.")]
    scale = {0: 1.0, 1: args.added_lr_scale}  # param group -> multiple of the schedule's lr
    optimizer = torch.optim.AdamW(
        [{"params": rest}, *([{"params": added}] if added else [])], lr=args.lr, weight_decay=1e-4
    )
    warmup = max(1, min(300, args.steps // 10))

    def lr_at(s: int) -> float:
        return (
            args.lr
            * min(1.0, (s + 1) / warmup)
            * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
        )

    generator = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    record = {
        "command": "python -m saferedir_shapes.train_backbone "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "params": params,
        "unet_config": {
            k: list(v) if isinstance(v, tuple) else v
            for k, v in new_unet(args.layout).config.items()
            if not k.startswith("_")
        },
        "scheduler": SCHEDULER_CONFIG,
        "seed": args.seed,
        "init": str(args.init) if args.init else None,
        "batch": args.batch,
        "pool": args.pool,
        "layout": args.layout,
        "lr": args.lr,
        "added_lr_scale": args.added_lr_scale,
        "dropout": {"cfg": args.cfg_dropout, "tokens": args.token_dropout, "pooled": args.pooled_dropout},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"unet: {params / 1e6:.2f} M parameters; {args.steps} steps at batch {args.batch}", flush=True)
    t_loop = time.time()
    for step in range(args.steps):
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr_at(step) * scale[i]
        idx = torch.randint(0, len(prompts), (args.batch,), generator=generator)
        x0 = x0_pool[idx]
        cond = embeds[idx].float()
        u = torch.rand(args.batch, generator=generator)
        drop = u < args.cfg_dropout
        cond[drop] = empty
        extra = {}
        if xl:  # u in [cfg, cfg + tokens): tokens dropped; [cfg + tokens, cfg + tokens + pooled): pooled
            pooled = pooled_pool[idx].float()
            drop_tokens = (u >= args.cfg_dropout) & (u < args.cfg_dropout + args.token_dropout)
            drop_pooled = (u >= args.cfg_dropout + args.token_dropout) & (
                u < args.cfg_dropout + args.token_dropout + args.pooled_dropout
            )
            cond[drop_tokens] = empty
            pooled[drop | drop_pooled] = empty_pool
            time_ids = torch.tensor([TIME_IDS]).expand(args.batch, -1)
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond, return_dict=False, **extra)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
        losses.append(float(loss.detach()))
        done = step + 1
        if done % 100 == 0 or done == args.steps:
            per = (time.time() - t_loop) / done
            print(
                f"step {done}/{args.steps} loss {np.mean(losses[-100:]):.4f} lr {lr_at(step):.2e} "
                f"{per:.3f} s/step eta {per * (args.steps - done) / 60:.1f} min",
                flush=True,
            )
        if done % args.ckpt_every == 0 or done == args.steps:
            record.update(
                steps_done=done,
                minutes=round((time.time() - start) / 60, 1),
                loss_last_100=round(float(np.mean(losses[-100:])), 5),
                loss_curve=[round(float(np.mean(losses[i : i + 100])), 5) for i in range(0, done, 500)],
            )
            state = {k: v.half().contiguous() for k, v in ema.state_dict().items()}
            save_atomic(state, record, args.out, args.layout)
    print(f"done in {(time.time() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
