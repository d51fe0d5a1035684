"""Train a redirector bundle from prompt pairs on a real pipeline: collect, cache, fit, write.

    from saferedir_sdk.training import TrainConfig, train_bundle
    summary = train_bundle(pipe, pairs, TrainConfig(concept="red"), "red.safetensors")

1. **Collect** (main process): run the pipeline's own sampler on every forget, retain and pool
   prompt for several seeds and record (latent, timestep, conditional embeddings) at every
   denoiser call, exactly what the guard sees. Cached as safetensors, keyed by the backbone
   fingerprint, a hash of the denoiser's weights, the prompts and the sampler settings, so
   training reruns without resampling and a retrained denoiser never reuses stale trajectories.
2. **Split** by pair: held-out pairs (and part of the pool) never reach the optimiser.
3. **Fit** (:func:`~saferedir_sdk.training.fit.fit_redirector`), under ``accelerate`` if launched
   with it: each process draws its own batches, gradients are averaged; early stopping on the
   held-out loss.
4. **Write** the bundle with a training summary (data sizes, held-out accuracy overall and per
   timestep quarter, redirection cosine to the paired retain embedding, time, versions).
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pluggy
import torch
from safetensors.torch import load_file, save_file

from ..bundle import ConceptInfo, save_bundle
from ..fingerprint import module_sha256
from ..plugins import default_plugin_manager, find_adapter
from ..redirector import Redirector, RedirectorConfig
from .fit import fit_redirector
from .pairs import PromptPairs
from .trajectories import Trajectories, record_trajectories

DEFAULT_CACHE = Path.home() / ".cache" / "saferedir" / "trajectories"


@dataclass
class TrainConfig:
    """Everything that determines a trained bundle (recorded in its metadata)."""

    concept: str
    category: str = "custom"
    description: str = ""
    seeds: tuple[int, ...] = (0, 1, 2)
    num_inference_steps: int = 20
    guidance_scale: float = 4.0
    heldout_fraction: float = 0.2
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    strength: float = 1.0
    token_dropout: float = 0.1
    embed_noise: float = 0.05
    eval_every: int = 100
    patience: int = 5
    hidden_dim: int = 128
    rank: int = 64
    token_layers: int = 1
    latent_pool: int = 16
    seed: int = 0


def _cache_key(fingerprint: dict[str, Any], prompts: list[str], cfg: TrainConfig, kind: str) -> str:
    payload = json.dumps([fingerprint, prompts, list(cfg.seeds), cfg.num_inference_steps, cfg.guidance_scale, kind])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def collect(
    pipe: Any, prompts: list[str], cfg: TrainConfig, *, kind: str, cache_dir: Path | None,
    plugin_manager: pluggy.PluginManager | None = None,
) -> Trajectories:
    """Recorded trajectories of ``prompts`` (from the cache when present)."""
    pm = plugin_manager or default_plugin_manager()
    adapter = find_adapter(pm, pipe)
    # the backbone fingerprint covers the text side; trajectories also depend on the denoiser's weights
    fingerprint = {**adapter.fingerprint(pipe).to_dict(), "denoiser_sha256": module_sha256(adapter.denoiser(pipe))}
    path = cache_dir / f"{kind}-{_cache_key(fingerprint, prompts, cfg, kind)}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        return Trajectories(**load_file(str(path)))
    traj = record_trajectories(pipe, prompts, seeds=cfg.seeds, num_inference_steps=cfg.num_inference_steps,
                               guidance_scale=cfg.guidance_scale, plugin_manager=pm)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({f.name: getattr(traj, f.name).contiguous() for f in fields(traj)}, str(tmp))
        tmp.replace(path)
    return traj


def train_bundle(
    pipe: Any,
    pairs: PromptPairs,
    cfg: TrainConfig,
    out: str | Path,
    *,
    cache_dir: Path | None = DEFAULT_CACHE,
    accelerator: Any = None,
    plugin_manager: pluggy.PluginManager | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a redirector for ``cfg.concept`` on ``pipe`` and write it to ``out``; returns the summary."""
    start = time.perf_counter()
    pm = plugin_manager or default_plugin_manager()
    adapter = find_adapter(pm, pipe)
    fingerprint = adapter.fingerprint(pipe)
    train_pairs, held_pairs = pairs.split(cfg.heldout_fraction, cfg.seed)
    sets = {
        "forget": [f for f, _ in train_pairs.pairs], "retain": [r for _, r in train_pairs.pairs],
        "heldout_forget": [f for f, _ in held_pairs.pairs], "heldout_retain": [r for _, r in held_pairs.pairs],
        "pool": train_pairs.retain_pool,
    }
    main = accelerator is None or accelerator.is_main_process
    if main:
        data = {k: collect(pipe, v, cfg, kind=k, cache_dir=cache_dir, plugin_manager=pm) for k, v in sets.items() if v}
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not main:
            data = {k: collect(pipe, v, cfg, kind=k, cache_dir=cache_dir, plugin_manager=pm) for k, v in sets.items() if v}
    t_collect = time.perf_counter() - start

    torch.manual_seed(cfg.seed)
    redirector = Redirector(RedirectorConfig(
        token_dim=fingerprint.token_dim, seq_len=fingerprint.seq_len, latent_channels=fingerprint.latent_channels,
        hidden_dim=cfg.hidden_dim, rank=cfg.rank, latent_pool=cfg.latent_pool, token_layers=cfg.token_layers,
    ))
    result = fit_redirector(
        redirector, data["forget"], data["retain"], negatives=data.get("pool"),
        heldout=(data["heldout_forget"], data["heldout_retain"]), steps=cfg.steps, batch_size=cfg.batch_size,
        lr=cfg.lr, strength=cfg.strength, token_dropout=cfg.token_dropout, embed_noise=cfg.embed_noise,
        eval_every=cfg.eval_every, patience=cfg.patience, seed=cfg.seed, accelerator=accelerator, progress=progress,
    )
    import diffusers
    import transformers

    summary = {
        "config": asdict(cfg),
        "data": {"train_pairs": len(train_pairs.pairs), "heldout_pairs": len(held_pairs.pairs),
                 "retain_pool": len(train_pairs.retain_pool), "train_rows": len(data["forget"]),
                 "heldout_rows": len(data["heldout_forget"]), "pool_rows": len(data["pool"]) if "pool" in data else 0},
        "heldout": result.heldout,
        "final_train_losses": result.final,
        "fit_steps": result.steps,
        "stopped_early": result.stopped_early,
        "seconds": {"collect": round(t_collect, 1), "fit": round(result.seconds, 1),
                    "total": round(time.perf_counter() - start, 1)},
        "processes": accelerator.num_processes if accelerator is not None else 1,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    if main:
        sha = save_bundle(out, redirector, ConceptInfo(cfg.concept, cfg.category, cfg.description), fingerprint, summary)
        summary["sha256"] = sha
    return summary
