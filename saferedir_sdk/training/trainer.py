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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import pluggy
import torch

from ..adapter import Adapter
from ..bundle import RedirectorBundle, save_bundle
from ..capacity import TRAINABLE
from ..concepts import ConceptInfo, OutcomeJudge
from ..engine import EngineConcept, RedirectionEngine
from ..fingerprint import module_sha256
from ..plugins import default_plugin_manager, find_adapter
from ..policy import ConceptRule, RedirectorRef
from ..redirector import Capacity, Redirector, RedirectorConfig
from .blends import blend_trajectories
from .fit import (
    FitResult,
    check_classify_below,
    check_shares,
    evaluate_redirector,
    fit_redirector,
)
from .pairs import PromptPairs
from .trajectories import Trajectories, record_trajectories

T = TypeVar("T")

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
    # with trainable "classifier": train and select the classifier on rows at normalised timesteps at
    # or below this only, where the policy's rules decide (their decide_at_t; 1: every row)
    classify_below: float = 1.0
    # after the fit: the forget prompts generated again *redirected* by the fitted redirector (as the
    # guard's second run redirects a flagged sample), labelled by the judge on those images, and this
    # many more steps with those rows classified too (needs an outcome judge; 0: off)
    refine_steps: int = 0
    # ... of those rows only the ones at normalised timesteps below this: earlier, a redirected
    # latent has not yet moved away from its unredirected twin, whose label it would contradict
    refine_below: float = 0.5
    # this many *blends* per forget generation (training and held-out): its recorded trajectory mixed
    # step by step with a retain-side generation's that started from the same noise (its pair's, or
    # the pool's at the same position) at a weight drawn uniformly from ``blend_weights``, labelled by
    # the outcome judge on the decoded mix, and classified only (blends.py): images on the boundary
    # between the concept and what is not, where the judge's line runs (needs an outcome judge and an
    # adapter that decodes latents; 0: off)
    blends: int = 0
    blend_weights: tuple[float, float] = (0.2, 0.8)
    # label every generation by the outcome judge's soft reading (``OutcomeJudge.soft``: in [0, 1],
    # above 0.5 where the image shows the concept) instead of its verdict: an image the judge barely
    # calls the concept is a target just over the line, not a certainty (needs an outcome judge
    # with a soft reading)
    soft_labels: bool = False
    # "redirection": fit only the delta, mask and scale heads of the ``init`` bundle; every module the
    # unsafe logit reads stays as it was, so the bundle decides exactly as before. "classifier": fit
    # only its classifier, reading what ``capacity.classifier_reads`` and ``classifier_encoder`` say
    # (fresh classifier modules where they differ from init's): it redirects exactly as before
    # (capacity.TRAINABLE)
    trainable: str = "all"
    # after the fit, every weight becomes the mean of the fitted one and ``init``'s: a uniform soup of
    # the two (Wortsman et al. 2022, "Model soups"); on the Shapes bundles the average of a heads refit
    # redirected held-out wordings better than either side alone (benchmarks/README.md, "Averaging a
    # refit of the heads with its init"). The summary's held-out figures are the average's, the
    # fit's own are kept beside them
    average_init: bool = False
    eval_every: int = 100
    patience: int = 5
    capacity: Capacity = field(default_factory=Capacity)
    pooled: bool = True  # read and move the backbone's pooled embedding, if it has one
    seed: int = 0

    def __post_init__(self) -> None:  # refused before minutes of sampling, not after
        check_shares(
            self.prompt_dropout,
            self.prompt_swap,
            self.swap_below,
            self.renoise,
            self.refine_below,
            self.classify_below,
        )
        low, high = self.blend_weights
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(
                f"blend_weights: expected (low, high) with 0 <= low <= high <= 1, got {self.blend_weights!r}"
            )
        for name in ("steps", "refine_steps", "blends"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected a whole number >= 0, got {value!r}")
        if self.steps == 0 and self.refine_steps == 0:
            raise ValueError("steps and refine_steps are both 0: nothing to train")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable: expected one of {TRAINABLE}, got {self.trainable!r}")
        check_classify_below(self.classify_below, self.trainable)
        if self.trainable == "redirection" and self.refine_steps:
            raise ValueError(
                "trainable 'redirection' with refine_steps: refining teaches the classifier, which "
                "'redirection' keeps as it is"
            )


def _cache_key(
    fingerprint: dict[str, Any],
    prompts: list[str],
    cfg: TrainConfig,
    kind: str,
    judge: str | None,
    redirection: dict[str, Any] | None = None,
) -> str:
    fields: list[Any] = [
        CACHE_FORMAT,
        fingerprint,
        prompts,
        list(cfg.seeds),
        cfg.num_inference_steps,
        cfg.guidance_scale,
        kind,
        judge,
    ]
    if redirection is not None:  # (unredirected recordings keep the keys they always had)
        fields.append(redirection)
    payload = json.dumps(fields)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _share_shown(labels: torch.Tensor) -> float:
    """The share of rows whose label says the image shows the concept (a soft one: above 0.5)."""
    return round(float((labels > 0.5).float().mean()), 4)


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
    engine: RedirectionEngine | None = None,
) -> Trajectories:
    """Recorded trajectories of ``prompts`` (from the cache when present), labelled by ``outcome``
    when given; with ``engine``, redirected by it (:func:`record_trajectories`; the cache key then
    holds its redirectors' weights and rules)."""
    cfg = with_sampler_defaults(cfg, adapter)
    # the backbone fingerprint covers the text side; trajectories also depend on the denoiser's weights
    fingerprint = {**adapter.fingerprint().to_dict(), "denoiser_sha256": module_sha256(adapter.denoiser)}
    redirection = (
        None
        if engine is None
        else {
            c.name: [module_sha256(c.redirector), c.rule.model_dump(mode="json", exclude={"redirector"})]
            for c in engine.concepts
        }
    )
    key = _cache_key(fingerprint, prompts, cfg, kind, outcome and outcome.name, redirection)
    path = cache_dir / f"{kind}-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        return Trajectories.load(path)
    traj = record_trajectories(
        adapter,
        prompts,
        seeds=cfg.seeds,
        num_inference_steps=cfg.num_inference_steps,  # type: ignore[arg-type]
        guidance_scale=cfg.guidance_scale,  # type: ignore[arg-type]
        outcome=outcome,
        engine=engine,
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


def _main_first(accelerator: Any, make: Callable[[], T]) -> T:
    """``make()`` on every process, the main one first (it records and caches; the others then
    read the cache): sampling happens once."""
    main = accelerator is None or accelerator.is_main_process
    if main:
        value = make()
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not main:
            value = make()
    return value


def _redirected_rows(
    adapter: Adapter,
    redirector: Redirector,
    sets: dict[str, list[str]],
    cfg: TrainConfig,
    cache_dir: Path | None,
    outcome: OutcomeJudge | None,
    accelerator: Any,
    out: str | Path,
) -> dict[str, Trajectories]:
    """The training and held-out forget prompts generated redirected by ``redirector`` (every sample
    flagged from the first check, strength ``cfg.strength``), each row labelled by its image; the
    rows at normalised timesteps below ``cfg.refine_below``."""
    below = cfg.refine_below
    rule = ConceptRule(
        concept=cfg.concept,
        category=cfg.category,  # type: ignore[arg-type]
        redirector=RedirectorRef(path=str(out)),
        strength=cfg.strength,
        escalate=1.0,
    )
    engine = RedirectionEngine([EngineConcept(rule, redirector)])
    moved = _main_first(
        accelerator,
        lambda: {
            k: collect(
                adapter,
                sets[k],
                cfg,
                kind=f"redirected_{k}",
                cache_dir=cache_dir,
                outcome=outcome,
                engine=engine,
            )
            for k in ("forget", "heldout_forget")
        },
    )
    return {k: rows.select(torch.nonzero(rows.timesteps < below).flatten()) for k, rows in moved.items()}


def _blended_rows(
    adapter: Adapter, data: dict[str, Trajectories], cfg: TrainConfig, outcome: OutcomeJudge
) -> dict[str, Trajectories]:
    """``cfg.blends`` blends of every training and held-out forget generation with the same side's
    retain and pool generations that started from its noise (:func:`blend_trajectories`), labelled
    by ``outcome`` on the adapter's decoding of each blend's last latent."""
    found = {}
    for kind, retain in (("forget", "retain"), ("heldout_forget", "heldout_retain")):
        if kind not in data:
            continue
        found[kind] = blend_trajectories(
            data[kind],
            [data[k] for k in (retain, "pool") if k in data],
            per_generation=cfg.blends,
            weights=cfg.blend_weights,
            decode=adapter.decode_latents,
            outcome=outcome.judge,
            seed=cfg.seed,
        )
    return found


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
    init: RedirectorBundle | None = None,
) -> dict[str, Any]:
    """Train a redirector for ``cfg.concept`` on ``pipe`` (through its adapter) and write it to
    ``out``; returns the summary. With ``outcome`` every trajectory is labelled by what its image
    became (the judge on the final image, per prompt and seed), not by its side of a pair.

    ``init``: start from that bundle's weights (its architecture; it must fit this backbone) instead
    of a fresh initialisation; with ``cfg.steps`` 0 only the refinement runs. ``cfg.refine_steps``:
    after the fit, the training and held-out forget prompts are generated again redirected by the
    fitted redirector (every sample flagged, as the guard's second run redirects one a ``rewind``
    rule confirmed: strength ``cfg.strength``, no escalation), labelled by ``outcome`` on those
    images, and the fit goes on for that many steps with them as classification rows: the classifier
    then knows a redirection that cleared the concept from one that did not (what escalation and
    ``unresolved`` read). The summary's ``refine`` holds the held-out figures before and after."""
    start = time.perf_counter()
    if cfg.steps == 0 and init is None:
        raise ValueError("steps 0: only a bundle given as init can be refined without a fit first")
    if cfg.trainable != "all" and init is None:
        raise ValueError(
            f"trainable {cfg.trainable!r} keeps the rest of the bundle it starts from: give that "
            "bundle as init"
        )
    if cfg.average_init and init is None:
        raise ValueError(
            "average_init: averages the fit with the bundle it starts from: give that bundle as init"
        )
    if cfg.refine_steps and outcome is None:
        raise ValueError(
            "refine_steps: labelling redirected trajectories needs the concept's outcome judge "
            "(a concept plugin's judge); none was given"
        )
    if cfg.blends and outcome is None:
        raise ValueError(
            "blends: only the concept's outcome judge can say which side of the boundary a blend "
            "ended on (a concept plugin's judge); none was given"
        )
    if cfg.soft_labels:
        if outcome is None:
            raise ValueError(
                "soft_labels: the labels are an outcome judge's soft reading; no judge was given"
            )
        outcome = outcome.softened()  # ValueError naming the judge where it has no soft reading
    adapter = find_adapter(plugin_manager or default_plugin_manager(), pipe)
    fingerprint = adapter.fingerprint()
    if init is not None:
        init.check_backbone(fingerprint)  # BackboneMismatchError naming the bundle and what differs
        # the architecture is init's (the summary records its capacity, not the command line's), but
        # for what a refitted classifier reads and through which encoder
        own = cfg.capacity
        classifier = {"classifier_reads": own.classifier_reads, "classifier_encoder": own.classifier_encoder}
        capacity = init.redirector.config.capacity
        cfg = replace(
            cfg, capacity=replace(capacity, **classifier) if cfg.trainable == "classifier" else capacity
        )
        if cfg.average_init and cfg.capacity != capacity:
            raise ValueError(
                "average_init: the fit's classifier reads or encodes otherwise than init's "
                f"({cfg.capacity.classifier_reads}/{cfg.capacity.classifier_encoder} against "
                f"{capacity.classifier_reads}/{capacity.classifier_encoder}): there is no weight to average it with"
            )
    if cfg.capacity.classifier_members > 1 and cfg.trainable != "redirection":
        raise ValueError(
            f"trainable {cfg.trainable!r}: a fit trains one classifier, this architecture has "
            f"{cfg.capacity.classifier_members} (an ensemble): fit each member alone (trainable "
            "'classifier') and join them with `saferedir bundle ensemble`; from an ensemble only "
            "trainable 'redirection' fits"
        )
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
    data = _main_first(
        accelerator,
        lambda: {
            k: collect(adapter, v, cfg, kind=k, cache_dir=cache_dir, outcome=outcome)
            for k, v in sets.items()
            if v
        },
    )
    blended = _blended_rows(adapter, data, cfg, outcome) if cfg.blends and outcome is not None else {}
    t_collect = time.perf_counter() - start

    torch.manual_seed(cfg.seed)
    if init is not None:
        redirector = Redirector(replace(init.redirector.config, capacity=cfg.capacity))
        state = init.redirector.state_dict()
        fresh = redirector.classifier_modules()
        if cfg.capacity != init.redirector.config.capacity:  # another classifier: fresh classifier modules
            dropped = set(fresh) | set(init.redirector.classifier_modules())
            state = {k: v for k, v in state.items() if k.split(".")[0] not in dropped}
        missing, unexpected = redirector.load_state_dict(state, strict=False)
        if unexpected or any(k.split(".")[0] not in fresh for k in missing):
            raise ValueError(f"init: weights that do not fit its own architecture: {missing + unexpected}")
    else:
        redirector = Redirector(RedirectorConfig.for_backbone(fingerprint, cfg.capacity, pooled=cfg.pooled))
    neutral = adapter.encode_prompts([""])[0].map(lambda t: t.float().cpu())
    heldout = (data["heldout_forget"], data["heldout_retain"])

    def fit(steps: int, seed: int, **extra: Any) -> FitResult:
        return fit_redirector(
            redirector,
            data["forget"],
            data["retain"],
            negatives=data.get("pool"),
            heldout=heldout,
            neutral=neutral,
            prompt_dropout=cfg.prompt_dropout,
            prompt_swap=cfg.prompt_swap,
            swap_below=cfg.swap_below,
            renoise=cfg.renoise,
            classify_below=cfg.classify_below,
            steps=steps,
            batch_size=cfg.batch_size,
            lr=cfg.lr,
            strength=cfg.strength,
            token_dropout=cfg.token_dropout,
            embed_noise=cfg.embed_noise,
            eval_every=cfg.eval_every,
            patience=cfg.patience,
            seed=seed,
            accelerator=accelerator,
            progress=progress,
            trainable=cfg.trainable,
            blended=blended.get("forget"),
            heldout_blended=blended.get("heldout_forget"),
            **extra,
        )

    result = fit(cfg.steps, cfg.seed) if cfg.steps else None
    refine: dict[str, Any] = {}
    if cfg.refine_steps:
        t_refine = time.perf_counter()
        moved = _redirected_rows(adapter, redirector, sets, cfg, cache_dir, outcome, accelerator, out)
        before = evaluate_redirector(
            redirector,
            *heldout,
            strength=cfg.strength,
            neutral=neutral,
            redirected=moved["heldout_forget"],
            blended=blended.get("heldout_forget"),
        )
        refined = fit(
            cfg.refine_steps,
            cfg.seed + 1,
            redirected=moved["forget"],
            heldout_redirected=moved["heldout_forget"],
        )
        refine = {
            "steps": refined.steps,
            "rows": {k: len(v) for k, v in moved.items()},
            "still_shows": {k: round(float(v.labels.mean()), 4) for k, v in moved.items()},  # type: ignore[union-attr]
            "before": before,
            "after": refined.heldout,
            "seconds": round(time.perf_counter() - t_refine, 1),
        }
        result = refined if result is None else result
    held_figures = refine["after"] if refine else result.heldout
    averaged: dict[str, Any] = {}
    if cfg.average_init:
        assert init is not None  # checked above
        start_state = init.redirector.state_dict()
        fitted_state = redirector.state_dict()
        redirector.load_state_dict({k: (v + start_state[k]) / 2 for k, v in fitted_state.items()})
        averaged = {"average_init": {"fitted_heldout": held_figures}}
        held_figures = evaluate_redirector(
            redirector,
            *heldout,
            strength=cfg.strength,
            neutral=neutral,
            blended=blended.get("heldout_forget"),
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
            "unsafe_share": {k: _share_shown(t.labels) for k, t in data.items() if t.labels is not None},
            **(
                {
                    "blends": {
                        k: {"rows": len(t), "unsafe_share": _share_shown(t.labels)}  # type: ignore[arg-type]
                        for k, t in blended.items()
                    }
                }
                if blended
                else {}
            ),
        },
        "heldout": held_figures,
        **averaged,
        "final_train_losses": result.final,
        "fit_steps": result.steps if cfg.steps else 0,
        "stopped_early": result.stopped_early,
        **({"renoise": result.renoise} if result.renoise else {}),
        **({"refine": refine} if refine else {}),
        **(
            {
                "init": {
                    "concept": init.concept.name,
                    "training_config": init.training.get("config"),
                    # the fits before it, each with its own init: the bundle's whole history
                    **({"init": init.training["init"]} if "init" in init.training else {}),
                }
            }
            if init
            else {}
        ),
        # an ensemble's other classifiers, unchanged by the (redirection-only) fit from it
        **({"ensemble": init.training["ensemble"]} if init and "ensemble" in init.training else {}),
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
