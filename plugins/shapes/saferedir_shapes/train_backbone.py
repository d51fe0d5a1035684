"""Train the Shapes backbone's UNet (seeded, reproducible, CPU-friendly).

    python -m saferedir_shapes.train_backbone --steps 8000 --out plugins/shapes/saferedir_shapes/weights

Data: a pool of renders of training attributes (held-out colour-shape pairs excluded) with one
training-vocabulary prompt each, encoded once by MiniLM. Objective: v-prediction on a cosine
schedule, 10% classifier-free-guidance dropout (empty prompt), AdamW with warm-up and cosine
decay, EMA of the weights (what ships). Writes ``shapes-unet.safetensors`` (EMA, fp16) and
``shapes-unet.json`` (command, time, losses) atomically, every ``--ckpt-every`` steps and at the end.
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

from .pipeline import SCHEDULER_CONFIG, new_unet, patchify
from .text import encode_text, load_text_encoder
from .world import make_prompt, render, sample_attributes


def build_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    attrs = [sample_attributes(rng, split="train") for _ in range(n)]
    images = np.stack([render(a, rng) for a in attrs])
    prompts = [make_prompt(a, rng, split="train") for a in attrs]
    labels = np.array([a.labels() for a in attrs])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return patchify(x), prompts, labels


def save_atomic(state: dict[str, torch.Tensor], record: dict, out: Path) -> None:
    with atomic_path(out / "shapes-unet.safetensors") as tmp:
        save_file(state, str(tmp))
    write_text_atomic(out / "shapes-unet.json", json.dumps(record, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--pool", type=int, default=40000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--cfg-dropout", type=float, default=0.1)
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
    embeds = torch.cat(
        [encode_text(encoder, tokenizer, prompts[i : i + 512]).half() for i in range(0, len(prompts), 512)]
    )
    empty = encode_text(encoder, tokenizer, [""])[0]
    print(f"pool: {len(prompts)} renders + prompts encoded in {time.time() - start:.0f} s", flush=True)

    unet = new_unet().train()
    if args.init is not None:
        from safetensors.torch import load_file

        unet.load_state_dict({k: v.float() for k, v in load_file(str(args.init)).items()}, strict=True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    params = sum(p.numel() for p in unet.parameters())
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = min(300, args.steps // 10)

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
            for k, v in new_unet().config.items()
            if not k.startswith("_")
        },
        "scheduler": SCHEDULER_CONFIG,
        "seed": args.seed,
        "init": str(args.init) if args.init else None,
        "batch": args.batch,
        "pool": args.pool,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"unet: {params / 1e6:.2f} M parameters; {args.steps} steps at batch {args.batch}", flush=True)
    t_loop = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        idx = torch.randint(0, len(prompts), (args.batch,), generator=generator)
        x0 = x0_pool[idx]
        cond = embeds[idx].float()
        drop = torch.rand(args.batch, generator=generator) < args.cfg_dropout
        cond[drop] = empty
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond, return_dict=False)[0]
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
            save_atomic({k: v.half().contiguous() for k, v in ema.state_dict().items()}, record, args.out)
    print(f"done in {(time.time() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
