"""Ensembles of classifiers (``saferedir bundle ensemble``): a bundle that redirects as its base and
decides by the mean p(unsafe) of several classifier fits, alone and stacked with other concepts."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import RED_PAIRS, STEPS
from saferedir_adapters.tiny import tiny_sd_pipeline
from test_bundle import FP, _inputs

from saferedir_sdk import (
    BackboneMismatchError,
    BundleFormatError,
    ConceptInfo,
    Redirector,
    RedirectorConfig,
    TextEncoderPrint,
)
from saferedir_sdk.bundle import classified_below, ensemble_bundle, load_bundle, save_bundle
from saferedir_sdk.capacity import Capacity
from saferedir_sdk.cli import main
from saferedir_sdk.redirector import mean_probability_logit
from saferedir_sdk.stacked import StackedRedirectors
from saferedir_sdk.training import PromptPairs, TrainConfig
from saferedir_sdk.training.trainer import train_bundle

OWN = Capacity(
    hidden_dim=64, rank=8, num_heads=4, latent_pool=8, latent_readout="mean+max", classifier_reads="latent",
    classifier_encoder="own",
)  # fmt: skip


def _bundle(path, seed, *, classify_below=None, concept=("striped", "artist_style"), capacity=OWN, fp=FP):
    """A bundle whose weights are drawn from ``seed`` (spread enough that the members' scores differ)."""
    torch.manual_seed(seed)
    red = Redirector(RedirectorConfig.for_backbone(fp, capacity))
    with torch.no_grad():
        for p in red.parameters():
            p.normal_(0.0, 0.3)
    config = {"trainable": "classifier", "classify_below": classify_below} if classify_below else {}
    save_bundle(
        path, red, ConceptInfo(*concept), fp, {"config": config, "heldout": {"heldout_accuracy": 0.9}}
    )
    return path


def test_an_ensemble_redirects_as_its_base_and_decides_by_the_mean_of_its_members_probabilities(tmp_path):
    base, b, c = (_bundle(tmp_path / f"{n}.safetensors", s) for n, s in (("base", 0), ("b", 1), ("c", 2)))
    out = tmp_path / "ens.safetensors"
    sha = ensemble_bundle(base, [b, c], out)
    ens = load_bundle(out, sha256=sha)
    assert ens.config.capacity.classifier_members == 3
    inputs = _inputs(3)
    outs = [load_bundle(p).redirector(*inputs) for p in (base, b, c)]
    got = ens.redirector(*inputs)
    mean = torch.stack([torch.sigmoid(o.logit) for o in outs]).mean(0)
    assert torch.allclose(torch.sigmoid(got.logit), mean, atol=1e-6), (got.logit, [o.logit for o in outs])
    assert not torch.allclose(torch.sigmoid(outs[0].logit), mean, atol=1e-3), "the members must differ here"
    for mine, theirs in zip(
        (*got.directions, *got.masks, got.alpha), (*outs[0].directions, *outs[0].masks, outs[0].alpha)
    ):
        assert torch.equal(mine, theirs), "the redirection is the base's, bit for bit"
    # stacked with a one-classifier concept of another architecture, and alone: the same scores
    stack = StackedRedirectors([ens.redirector, load_bundle(out).redirector])
    assert torch.allclose(stack(*inputs).logit[0], got.logit, atol=1e-5)
    members = ens.training["ensemble"]["members"]
    assert [m["sha256"] for m in members] == [load_bundle(p).sha256 for p in (b, c)]
    assert ens.training["ensemble"]["base"]["sha256"] == load_bundle(base).sha256


def test_the_mean_probability_is_exact_at_large_logits_and_a_nan_member_is_never_safe():
    logits = torch.tensor([[50.0, -50.0, 1000.0, 0.3], [50.0, -50.0, -1000.0, -1.2], [50.0, -50.0, 0.0, 2.0]])
    got = mean_probability_logit(logits)
    assert torch.allclose(got[:2], torch.tensor([50.0, -50.0]), atol=1e-4)
    p = (1.0 + 0.0 + 0.5) / 3
    assert torch.isclose(got[2], torch.tensor(p).logit(), atol=1e-5)
    assert torch.isclose(torch.sigmoid(got[3]), torch.sigmoid(logits[:, 3]).mean(), atol=1e-6)
    nan = mean_probability_logit(torch.tensor([[-30.0], [float("nan")]]))
    assert torch.isnan(nan).all(), (
        "a NaN member makes the ensemble's score NaN (the engine fails closed on it)"
    )
    one = torch.tensor([[0.25, -3.0]])
    assert torch.equal(mean_probability_logit(one), one[0])


def test_an_ensemble_decides_only_where_every_member_was_trained(tmp_path):
    base = _bundle(tmp_path / "base.safetensors", 0)
    b = _bundle(tmp_path / "b.safetensors", 1, classify_below=0.5)
    c = _bundle(tmp_path / "c.safetensors", 2, classify_below=0.8)
    ensemble_bundle(base, [b, c], tmp_path / "ens.safetensors")
    ens = load_bundle(tmp_path / "ens.safetensors")
    assert (classified_below(load_bundle(base)), classified_below(ens)) == (1.0, 0.5)
    ens.training.pop("ensemble")  # a history that does not record its members is refused
    with pytest.raises(BundleFormatError, match="'ensemble.members' must record the 2 classifier"):
        classified_below(ens)


def test_what_cannot_join_an_ensemble_is_refused_by_name_and_nothing_is_written(tmp_path):
    base = _bundle(tmp_path / "base.safetensors", 0)
    out = tmp_path / "ens.safetensors"
    cases = [
        (
            _bundle(tmp_path / "red.safetensors", 1, concept=("red", "nsfw")),
            BundleFormatError,
            "trained for concept 'red'",
        ),
        (
            _bundle(tmp_path / "wide.safetensors", 1, capacity=replace(OWN, hidden_dim=32)),
            BundleFormatError,
            "its architecture differs from the base's",
        ),
        (base, BundleFormatError, "its classifier is one the ensemble already holds"),
    ]
    other_fp = replace(FP, encoders=(TextEncoderPrint("text_encoder", "a" * 64, "c" * 64),))
    cases.append((_bundle(tmp_path / "other.safetensors", 1, fp=other_fp), BackboneMismatchError, "weights"))
    for member, error, message in cases:
        with pytest.raises(error, match=message) as info:
            ensemble_bundle(base, [member], out)
        assert str(member.name) in str(info.value)
        assert not out.exists()
    shared = _bundle(
        tmp_path / "shared.safetensors",
        3,
        capacity=replace(OWN, classifier_reads="latent+prompt", classifier_encoder="shared"),
    )
    with pytest.raises(
        BundleFormatError, match="an ensemble's base needs one classifier with a latent encoder of its own"
    ):
        ensemble_bundle(shared, [base], out)
    ensemble_bundle(base, [_bundle(tmp_path / "b.safetensors", 1)], tmp_path / "two.safetensors")
    with pytest.raises(BundleFormatError, match="classifier_members 1\\), got 'own' with 2"):
        ensemble_bundle(tmp_path / "two.safetensors", [tmp_path / "b.safetensors"], out)
    with pytest.raises(ValueError, match="at least one member"):
        ensemble_bundle(base, [], out)
    assert not out.exists()
    with pytest.raises(ValueError, match="several members need classifier_encoder 'own'"):
        Capacity(classifier_members=2)


def test_a_fit_never_trains_an_ensemble(tmp_path):
    cfg = TrainConfig("red", capacity=replace(OWN, classifier_members=2), steps=1)
    out = tmp_path / "red.safetensors"
    with pytest.raises(ValueError, match="a fit trains one classifier, this architecture has 2"):
        train_bundle(tiny_sd_pipeline(0), PromptPairs(list(RED_PAIRS), []), cfg, out, cache_dir=None)
    assert not out.exists()


def test_saferedir_bundle_ensemble_writes_and_inspect_shows_every_member(tmp_path, capsys):
    base, b = (
        _bundle(tmp_path / "base.safetensors", 0),
        _bundle(tmp_path / "b.safetensors", 1, classify_below=0.5),
    )
    out = tmp_path / "ens.safetensors"
    assert main(["bundle", "ensemble", str(base), str(b), "--out", str(out)]) == 0
    assert "deciding by the mean p(unsafe) of 2 classifiers" in capsys.readouterr().out
    assert main(["bundle", "inspect", str(out)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["classify_below"] == 0.5 and shown["config"]["capacity"]["classifier_members"] == 2
    assert shown["ensemble_members"] == [{"sha256": load_bundle(b).sha256, "heldout_accuracy": 0.9}]


def test_a_redirection_refit_of_an_ensemble_keeps_every_member_and_its_record(tmp_path):
    """``trainable redirection`` from an ensemble: every classifier weight as it was, and the record
    of the members carried over (without it the bundle written could not say where it may decide)."""
    from saferedir_adapters.sd import StableDiffusionAdapter

    pipe = tiny_sd_pipeline(0)
    fp = StableDiffusionAdapter(pipe).fingerprint()
    red = ("red", "custom")
    base = _bundle(tmp_path / "base.safetensors", 0, concept=red, fp=fp)
    member = _bundle(tmp_path / "m.safetensors", 1, concept=red, fp=fp, classify_below=0.5)
    ensemble_bundle(base, [member], tmp_path / "ens.safetensors")
    init = load_bundle(tmp_path / "ens.safetensors")
    cfg = TrainConfig(
        concept="red", category="custom", seeds=(0,), num_inference_steps=STEPS, guidance_scale=7.5,
        steps=5, eval_every=5, batch_size=16, trainable="redirection",
    )  # fmt: skip
    out = tmp_path / "refit.safetensors"
    train_bundle(
        pipe, PromptPairs(list(RED_PAIRS) * 2, []), cfg, out, cache_dir=None, init=init, progress=False
    )
    refit = load_bundle(out)
    assert refit.training["ensemble"] == init.training["ensemble"] and classified_below(refit) == 0.5
    before, after = init.redirector.state_dict(), refit.redirector.state_dict()
    decision = init.redirector.decision_modules()
    assert {k.split(".")[0] for k in before if k.startswith("member1_")} <= set(decision)
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k.split(".")[0] in decision)
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if k.split(".")[0] not in decision)
