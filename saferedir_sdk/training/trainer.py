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
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import pluggy
import torch

from ..adapter import Adapter
from ..bundle import save_bundle
from ..concepts import ConceptInfo, OutcomeJudge
from ..fingerprint import module_sha256
from ..plugins import default_plugin_manager, find_adapter
from ..redirector import Capacity, Redirector, RedirectorConfig
from .fit import check_shares, fit_redirector
from .pairs import PromptPairs
from .trajectories import Trajectories, record_trajectories

DEFAULT_CACHE = Path.home() / ".cache" / "saferedir" / "trajectories"
CACHE_FORMAT = 2  # bumped when what a cached file holds changes (2: normalised timesteps, token streams)


@dataclass
class TrainConfig:
    """Everything that determines a trained bundle (recorded in its metadata). ``num_inference_steps``
    and ``guidance_scale`` None: the pipeline's own defaults (:meth:`Adapter.sampler_defaults`; the
    Shapes backbone's 20 steps at guidance 1.5), resolved before sampling and recorded."""

    concept: str
    category: str = "custom"
    description: str = ""
    seeds: tuple[int, ...] = (0, 1, 2)
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    heldout_fraction: float = 0.2
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    strength: float = 1.0
    token_dropout: float = 0.1
    embed_noise: float = 0.05
    prompt_dropout: float = 0.3  # share of the classifier's augmented rows whose prompt is replaced by ""
    prompt_swap: float = 0.0  # share of late pairs also classified with their prompts exchanged
    swap_below: float = 0.5  # "late": normalised timesteps below this
    renoise: float = 0.0  # share of drawn rows whose starting noise is another generation's (renoise.py)
    eval_every: int = 100
    patience: int = 5
    capacity: Capacity = field(default_factory=Capacity)
    pooled: bool = True  # read and move the backbone's pooled embedding, if it has one
    seed: int = 0

    def __post_init__(self) -> None:  # refused before minutes of sampling, not after
        check_shares(self.prompt_dropout, self.prompt_swap, self.swap_below, self.renoise)


def _cache_key(
    fingerprint: dict[str, Any], prompts: list[str], cfg: TrainConfig, kind: str, judge: str | None
) -> str:
    payload = json.dumps(
        [
            CACHE_FORMAT,
            fingerprint,
            prompts,
            list(cfg.seeds),
            cfg.num_inference_steps,
            cfg.guidance_scale,
            kind,
            judge,
        ]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def with_sampler_defaults(cfg: TrainConfig, adapter: Adapter) -> TrainConfig:
    """``cfg`` with unset sampler settings taken from the pipeline's own defaults."""
    steps, guidance = adapter.sampler_defaults()
    return replace(
        cfg,
        num_inference_steps=cfg.num_inference_steps if cfg.num_inference_steps is not None else steps,
        guidance_scale=cfg.guidance_scale if cfg.guidance_scale is not None else guidance,
    )


def collect(
    adapter: Adapter,
    prompts: list[str],
    cfg: TrainConfig,
    *,
    kind: str,
    cache_dir: Path | None,
    outcome: OutcomeJudge | None = None,
) -> Trajectories:
    """Recorded trajectories of ``prompts`` (from the cache when present), labelled by ``outcome``
    when given."""
    cfg = with_sampler_defaults(cfg, adapter)
    # the backbone fingerprint covers the text side; trajectories also depend on the denoiser's weights
    fingerprint = {**adapter.fingerprint().to_dict(), "denoiser_sha256": module_sha256(adapter.denoiser)}
    path = (
        cache_dir
        / f"{kind}-{_cache_key(fingerprint, prompts, cfg, kind, outcome and outcome.name)}.safetensors"
        if cache_dir
        else None
    )
    if path is not None and path.is_file():
        return Trajectories.load(path)
    traj = record_trajectories(
        adapter,
        prompts,
        seeds=cfg.seeds,
        num_inference_steps=cfg.num_inference_steps,  # type: ignore[arg-type]
        guidance_scale=cfg.guidance_scale,  # type: ignore[arg-type]
        outcome=outcome,
    )
    if path is not None:
        traj.save(path)
    return traj


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("saferedir-sdk", "diffusers", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


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
    outcome: OutcomeJudge | None = None,
) -> dict[str, Any]:
    """Train a redirector for ``cfg.concept`` on ``pipe`` (through its adapter) and write it to
    ``out``; returns the summary. With ``outcome`` every trajectory is labelled by what its image
    became (the judge on the final image, per prompt and seed), not by its side of a pair."""
    start = time.perf_counter()
    adapter = find_adapter(plugin_manager or default_plugin_manager(), pipe)
    fingerprint = adapter.fingerprint()
    cfg = with_sampler_defaults(cfg, adapter)
    train_pairs, held_pairs = pairs.split(cfg.heldout_fraction, cfg.seed)
    sets = {
        "forget": [f for f, _ in train_pairs.pairs],
        "retain": [r for _, r in train_pairs.pairs],
        "heldout_forget": [f for f, _ in held_pairs.pairs],
        "heldout_retain": [r for _, r in held_pairs.pairs],
        "pool": train_pairs.retain_pool,
    }
    main = accelerator is None or accelerator.is_main_process
    if main:
        data = {
            k: collect(adapter, v, cfg, kind=k, cache_dir=cache_dir, outcome=outcome)
            for k, v in sets.items()
            if v
        }
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not main:
            data = {
                k: collect(adapter, v, cfg, kind=k, cache_dir=cache_dir, outcome=outcome)
                for k, v in sets.items()
                if v
            }
    t_collect = time.perf_counter() - start

    torch.manual_seed(cfg.seed)
    redirector = Redirector(RedirectorConfig.for_backbone(fingerprint, cfg.capacity, pooled=cfg.pooled))
    result = fit_redirector(
        redirector,
        data["forget"],
        data["retain"],
        negatives=data.get("pool"),
        heldout=(data["heldout_forget"], data["heldout_retain"]),
        neutral=adapter.encode_prompts([""])[0].map(lambda t: t.float().cpu()),
        prompt_dropout=cfg.prompt_dropout,
        prompt_swap=cfg.prompt_swap,
        swap_below=cfg.swap_below,
        renoise=cfg.renoise,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        strength=cfg.strength,
        token_dropout=cfg.token_dropout,
        embed_noise=cfg.embed_noise,
        eval_every=cfg.eval_every,
        patience=cfg.patience,
        seed=cfg.seed,
        accelerator=accelerator,
        progress=progress,
    )
    summary = {
        "config": asdict(cfg),
        "data": {
            "train_pairs": len(train_pairs.pairs),
            "heldout_pairs": len(held_pairs.pairs),
            "retain_pool": len(train_pairs.retain_pool),
            "train_rows": len(data["forget"]),
            "heldout_rows": len(data["heldout_forget"]),
            "pool_rows": len(data["pool"]) if "pool" in data else 0,
            "labels": outcome.name if outcome is not None else "prompt side (forget 1, retain and pool 0)",
            "unsafe_share": {
                k: round(float(t.labels.mean()), 4) for k, t in data.items() if t.labels is not None
            },
        },
        "heldout": result.heldout,
        "final_train_losses": result.final,
        "fit_steps": result.steps,
        "stopped_early": result.stopped_early,
        **({"renoise": result.renoise} if result.renoise else {}),
        "seconds": {
            "collect": round(t_collect, 1),
            "fit": round(result.seconds, 1),
            "total": round(time.perf_counter() - start, 1),
        },
        "processes": accelerator.num_processes if accelerator is not None else 1,
        "versions": _versions(),
    }
    if main:
        sha = save_bundle(
            out, redirector, ConceptInfo(cfg.concept, cfg.category, cfg.description), fingerprint, summary
        )
        summary["sha256"] = sha
    return summary
