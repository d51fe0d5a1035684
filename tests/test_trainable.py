"""Fitting the redirection heads alone (``trainable="redirection"``): every decision of the bundle it
starts from is kept bit for bit, only where and how far a flagged prompt moves is learnt."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch
from helpers import RED_PAIRS, STEPS
from saferedir_adapters.tiny import tiny_sd_pipeline

from saferedir_sdk import Conditioning, Redirector, RedirectorConfig, TokenStream, load_bundle
from saferedir_sdk.capacity import Capacity
from saferedir_sdk.training import PromptPairs, TrainConfig, Trajectories, fit_redirector
from saferedir_sdk.training.trainer import train_bundle

STREAMS = (TokenStream("text_encoder", 6, 16),)


def _rows(shift: float, n: int = 64) -> Trajectories:
    g = torch.Generator().manual_seed(int(shift * 10) + 1)
    tokens = torch.randn(n, 6, 16, generator=torch.Generator().manual_seed(0))
    tokens[:, 2] += shift * 3.0  # the concept word: the pair's only difference in the prompt
    return Trajectories(
        torch.randn(n, 4, 8, 8, generator=g) + shift,
        torch.rand(n, generator=g),
        Conditioning((tokens,)),
        torch.zeros(n, dtype=torch.int64),
        torch.arange(n),
        torch.zeros(n, dtype=torch.int64),
    )


def _split(red: Redirector) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(decision weights, every other weight) of ``red``, copied."""
    decision = red.decision_modules()
    state = {k: v.clone() for k, v in red.state_dict().items()}
    mine = {k: v for k, v in state.items() if k.split(".")[0] in decision}
    return mine, {k: v for k, v in state.items() if k not in mine}


@pytest.mark.parametrize("reads", ["latent", "latent+prompt"])
def test_fitting_the_redirection_alone_keeps_every_decision_bit_for_bit(reads):
    capacity = Capacity(
        hidden_dim=64, rank=8, num_heads=4, latent_pool=8, token_layers=1, classifier_reads=reads
    )
    forget, retain = _rows(1.0), _rows(0.0)
    probe = _rows(0.5, n=16).inputs("cpu")
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig(STREAMS, 4, capacity=capacity))
    fit_redirector(red, forget, retain, steps=40, batch_size=32)  # a classifier that decides something
    decision, heads = _split(red)
    logits = red(*probe).logit
    result = fit_redirector(
        red, forget, retain, steps=60, batch_size=32, trainable="redirection", log_every=59
    )
    after, heads_after = _split(red)
    assert all(torch.equal(v, after[k]) for k, v in decision.items())
    assert torch.equal(red(*probe).logit, logits), "every decision as before"
    changed = [k for k, v in heads.items() if not torch.equal(v, heads_after[k])]
    assert any(k.startswith(("delta_", "mask_head", "scale_head")) for k in changed)
    assert result.history[-1]["redirection"] < result.history[0]["redirection"]
    # the same fit with every module trainable moves the decision: the check above can fail
    fit_redirector(red, forget, retain, steps=5, batch_size=32)
    assert not torch.equal(red(*probe).logit, logits)


def test_a_classifier_reading_the_prompt_keeps_the_prompt_modules_it_reads():
    latent = Redirector(
        RedirectorConfig(STREAMS, 4, capacity=Capacity(hidden_dim=64, classifier_reads="latent"))
    )
    both = Redirector(RedirectorConfig(STREAMS, 4, pooled_dim=12, capacity=Capacity(hidden_dim=64)))
    assert "token_projs" not in latent.decision_modules()
    assert {"token_projs", "positions", "cross_attention", "pooled_proj"} <= set(both.decision_modules())
    for red in (latent, both):  # every name is a module of the redirector
        assert all(hasattr(red, name) for name in red.decision_modules())


def _redirection_fit(bundles) -> tuple[object, PromptPairs, object, TrainConfig]:
    """The tiny SD pipeline, red pairs, the tiny red bundle and a 20-step redirection-only fit of it."""
    pipe = tiny_sd_pipeline(0)
    pairs = PromptPairs(list(RED_PAIRS) * 2, [])
    init = load_bundle(bundles["red"])
    cfg = TrainConfig(
        concept="red", seeds=(0,), num_inference_steps=STEPS, guidance_scale=7.5, steps=20, eval_every=10,
        batch_size=16, trainable="redirection",
    )  # fmt: skip
    return pipe, pairs, init, cfg


def test_train_bundle_fits_the_redirection_of_its_init_bundle_and_nothing_else(bundles, tmp_path):
    pipe, pairs, init, cfg = _redirection_fit(bundles)
    summary = train_bundle(
        pipe, pairs, cfg, tmp_path / "red.safetensors", cache_dir=None, init=init, progress=False
    )
    fitted = load_bundle(tmp_path / "red.safetensors")
    assert summary["config"]["trainable"] == "redirection" and summary["init"]["concept"] == "red"
    # the architecture is init's, and so is the capacity the summary records (not TrainConfig's default)
    assert cfg.capacity != init.redirector.config.capacity
    assert summary["config"]["capacity"] == asdict(init.redirector.config.capacity)
    decision, heads = _split(init.redirector)
    after, heads_after = _split(fitted.redirector)
    assert all(torch.equal(v, after[k]) for k, v in decision.items())
    assert any(not torch.equal(v, heads_after[k]) for k, v in heads.items())


def test_fitting_the_redirection_alone_is_refused_where_it_means_nothing(bundles, tmp_path):
    rows = _rows(0.0, n=8)
    red = Redirector(RedirectorConfig(STREAMS, 4, capacity=Capacity(hidden_dim=64)))
    with pytest.raises(ValueError, match="trainable: expected one of"):
        fit_redirector(red, rows, rows, steps=1, trainable="heads")
    with pytest.raises(ValueError, match="trainable: expected one of"):
        TrainConfig("red", trainable="heads")
    with pytest.raises(ValueError, match="refining teaches the classifier"):
        TrainConfig("red", trainable="redirection", refine_steps=5)
    out = tmp_path / "red.safetensors"
    with pytest.raises(ValueError, match="give that bundle as init"):
        train_bundle(
            tiny_sd_pipeline(0), PromptPairs(list(RED_PAIRS), []), TrainConfig("red", trainable="redirection"),
            out, cache_dir=None,
        )  # fmt: skip
    assert not out.exists()


def _moves(out) -> list[torch.Tensor]:
    return [*out.directions, *out.masks, out.alpha]


def test_a_classifier_with_its_own_encoder_is_refitted_without_moving_a_redirection():
    capacity = Capacity(
        hidden_dim=64, rank=8, num_heads=4, latent_pool=8, token_layers=1, classifier_reads="latent",
        classifier_encoder="own",
    )  # fmt: skip
    forget, retain = _rows(1.0), _rows(0.0)
    probe = _rows(0.5, n=16).inputs("cpu")
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig(STREAMS, 4, capacity=capacity))
    assert set(red.decision_modules()) == set(red.classifier_modules()) >= {"classifier_latent_encoder"}
    fit_redirector(red, forget, retain, steps=40, batch_size=32)
    before = red(*probe)
    shared = {
        k: v.clone() for k, v in red.state_dict().items() if k.split(".")[0] not in red.classifier_modules()
    }
    fit_redirector(red, forget, retain, steps=40, batch_size=32, trainable="classifier")
    after = red(*probe)
    assert all(torch.equal(a, b) for a, b in zip(_moves(before), _moves(after))), "every move as before"
    assert not torch.equal(before.logit, after.logit)
    assert all(torch.equal(v, red.state_dict()[k]) for k, v in shared.items())
    # and the other way round: the heads (and the shared encoder they read) learn, no decision moves
    fit_redirector(red, forget, retain, steps=20, batch_size=32, trainable="redirection")
    again = red(*probe)
    assert torch.equal(again.logit, after.logit)
    assert not all(torch.equal(a, b) for a, b in zip(_moves(after), _moves(again)))


def test_a_classifier_fitted_below_a_noise_level_never_draws_or_selects_on_a_noisier_row():
    """``classify_below``: the rows above it are poisoned (NaN latents): a fit that drew one, or a
    held-out evaluation that read one, would end in NaN weights or a NaN selection score."""
    capacity = Capacity(
        hidden_dim=32, rank=4, num_heads=2, latent_pool=8, token_layers=0, classifier_reads="latent",
        classifier_encoder="own",
    )  # fmt: skip
    forget = _rows(1.0)
    retain = replace(_rows(0.0), timesteps=forget.timesteps.clone())  # a pair's rows share their step
    for rows in (forget, retain):
        rows.latents[rows.timesteps > 0.5] = float("nan")
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig(STREAMS, 4, capacity=capacity))
    result = fit_redirector(
        red, forget, retain, negatives=retain, heldout=(forget, retain), steps=20, batch_size=16,
        eval_every=10, trainable="classifier", classify_below=0.5,
    )  # fmt: skip
    assert all(torch.isfinite(v).all() for v in red.state_dict().values())
    assert result.heldout and result.heldout["heldout_selection"] == result.heldout["heldout_selection"]
    late = _rows(1.0).select((forget.timesteps <= 0.5).nonzero().squeeze(1)).inputs("cpu")
    assert torch.isfinite(red(*late).logit).all()
    # without it the poisoned rows are drawn: the check above can fail
    fit_redirector(red, forget, retain, steps=5, batch_size=16, trainable="classifier")
    assert not all(torch.isfinite(v).all() for v in red.state_dict().values())


def test_classify_below_is_refused_where_it_would_mean_nothing():
    forget, retain = _rows(1.0), _rows(0.0)
    red = Redirector(RedirectorConfig(STREAMS, 4, capacity=Capacity(hidden_dim=32, rank=4, num_heads=2)))
    with pytest.raises(ValueError, match="classify_below 0.5: only with trainable 'classifier'"):
        fit_redirector(red, forget, retain, steps=2, classify_below=0.5)
    with pytest.raises(ValueError, match="classify_below 0.5: only with trainable 'classifier'"):
        TrainConfig("red", classify_below=0.5)
    with pytest.raises(ValueError, match="classify_below: expected a share in"):
        TrainConfig("red", trainable="classifier", classify_below=0.0)
    early = replace(forget, timesteps=torch.full_like(forget.timesteps, 0.9))
    with pytest.raises(ValueError, match="classify_below 0.5: no training or held-out row at or below it"):
        fit_redirector(red, early, early, steps=2, trainable="classifier", classify_below=0.5)


def test_an_own_classifier_encoder_needs_a_classifier_that_reads_the_latent_alone():
    with pytest.raises(ValueError, match="classifier_encoder: 'own' needs classifier_reads 'latent'"):
        Capacity(classifier_encoder="own")
    with pytest.raises(ValueError, match="Capacity.classifier_encoder: expected one of"):
        Capacity(classifier_reads="latent", classifier_encoder="separate")


def test_train_bundle_gives_a_bundle_a_classifier_of_its_own_and_keeps_its_redirection(bundles, tmp_path):
    """A bundle whose classifier reads the prompt (the tiny red one) gets a fresh latent-only classifier
    with its own encoder: every weight of the redirection is the init's, the summary says what was
    fitted."""
    pipe = tiny_sd_pipeline(0)
    init = load_bundle(bundles["red"])
    assert init.redirector.config.capacity.classifier_reads == "latent+prompt"
    cfg = TrainConfig(
        concept="red", seeds=(0,), num_inference_steps=STEPS, guidance_scale=7.5, steps=20, eval_every=10,
        batch_size=16, trainable="classifier",
        capacity=Capacity(classifier_reads="latent", classifier_encoder="own"),
    )  # fmt: skip
    pairs = PromptPairs(list(RED_PAIRS) * 2, [])
    summary = train_bundle(
        pipe, pairs, cfg, tmp_path / "red.safetensors", cache_dir=None, init=init, progress=False
    )
    fitted = load_bundle(tmp_path / "red.safetensors").redirector
    capacity = fitted.config.capacity
    assert (capacity.classifier_reads, capacity.classifier_encoder) == ("latent", "own")
    assert capacity.hidden_dim == init.redirector.config.capacity.hidden_dim != Capacity().hidden_dim
    assert (
        summary["config"]["capacity"] == asdict(capacity) and summary["config"]["trainable"] == "classifier"
    )
    old = init.redirector.state_dict()
    new = fitted.state_dict()
    kept = [k for k in old if k.split(".")[0] != "classifier"]
    assert kept and all(torch.equal(old[k], new[k]) for k in kept)
    assert {k.split(".")[0] for k in set(new) - set(old)} == {
        "classifier_latent_encoder", "classifier_latent_proj", "classifier_time_mlp"
    }  # fmt: skip
    # and back: a classifier that reads the prompt again through the shared features (the own
    # encoder's weights dropped, nothing of the redirection moved)
    again = load_bundle(tmp_path / "red.safetensors")
    train_bundle(
        pipe, pairs, replace(cfg, capacity=Capacity()), tmp_path / "back.safetensors", cache_dir=None, init=again,
        progress=False,
    )  # fmt: skip
    back = load_bundle(tmp_path / "back.safetensors").redirector
    assert back.config.capacity == init.redirector.config.capacity
    assert set(back.state_dict()) == set(old) and all(torch.equal(old[k], back.state_dict()[k]) for k in kept)


def test_average_init_writes_the_mean_of_the_fit_and_its_init_and_keeps_the_decision(bundles, tmp_path):
    """``average_init``: the bundle written is, weight for weight, the mean of what the same fit
    writes without it and of the init (a uniform soup of the two); a redirection-only fit keeps every
    decision weight, and the summary keeps the fit's own held-out figures beside the average's."""
    pipe, pairs, init, cfg = _redirection_fit(bundles)
    plain = train_bundle(
        pipe, pairs, cfg, tmp_path / "fit.safetensors", cache_dir=None, init=init, progress=False
    )
    soup = train_bundle(
        pipe, pairs, replace(cfg, average_init=True), tmp_path / "soup.safetensors", cache_dir=None, init=init,
        progress=False,
    )  # fmt: skip
    start = init.redirector.state_dict()
    fitted = load_bundle(tmp_path / "fit.safetensors").redirector.state_dict()
    mean = load_bundle(tmp_path / "soup.safetensors").redirector.state_dict()
    assert set(mean) == set(start) == set(fitted)
    assert all(torch.equal(mean[k], (fitted[k] + start[k]) / 2) for k in mean)
    moved = [k for k in mean if not torch.equal(fitted[k], start[k])]
    assert moved and all(not torch.equal(mean[k], fitted[k]) for k in moved)
    decision, _ = _split(init.redirector)
    assert all(torch.equal(v, mean[k]) for k, v in decision.items())
    assert soup["config"]["average_init"] is True and "average_init" not in plain
    assert soup["average_init"]["fitted_heldout"] == plain["heldout"]
    assert soup["heldout"] != plain["heldout"]  # the average's own figures, evaluated on it


def test_average_init_is_refused_without_an_init_or_across_architectures(bundles, tmp_path):
    pipe = tiny_sd_pipeline(0)
    pairs = PromptPairs(list(RED_PAIRS), [])
    out = tmp_path / "red.safetensors"
    with pytest.raises(ValueError, match="average_init: averages the fit with the bundle it starts from"):
        train_bundle(pipe, pairs, TrainConfig("red", average_init=True), out, cache_dir=None)
    init = load_bundle(bundles["red"])  # its classifier reads the prompt through the shared encoder
    own = TrainConfig(
        "red", trainable="classifier", average_init=True,
        capacity=Capacity(classifier_reads="latent", classifier_encoder="own"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="latent/own against latent\\+prompt/shared.*no weight to average"):
        train_bundle(pipe, pairs, own, out, cache_dir=None, init=init)
    assert not out.exists()
