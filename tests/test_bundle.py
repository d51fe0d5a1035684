"""Bundle files: round trip and every typed failure."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from helpers import FORGET, RETAIN, generate
from safetensors.torch import save_file

from saferedir_sdk import (
    BackboneFingerprint,
    BackboneMismatchError,
    BundleFormatError,
    BundleIntegrityError,
    BundleNotFoundError,
    ConceptInfo,
    Conditioning,
    GuardBuildError,
    Redirector,
    RedirectorConfig,
    SafeRedirGuard,
    TextEncoderPrint,
    TokenStream,
    load_bundle,
    save_bundle,
    upgrade_bundle,
)
from saferedir_sdk.bundle import file_sha256
from saferedir_sdk.capacity import Capacity

SMALL = Capacity(hidden_dim=64, rank=8, num_heads=4, latent_pool=8, token_layers=1)

ROOT = Path(__file__).resolve().parents[1]


def fingerprint(dim=32, seq_len=77, pooled=0) -> BackboneFingerprint:
    return BackboneFingerprint(
        (TokenStream("text_encoder", seq_len, dim),),
        pooled,
        4,
        (TextEncoderPrint("text_encoder", "a" * 64, "b" * 64),),
        "sd1",
    )


FP = fingerprint()


def _redirector(dim=32, seq_len=77, capacity=SMALL) -> Redirector:
    torch.manual_seed(0)
    return Redirector(RedirectorConfig.for_backbone(fingerprint(dim, seq_len), capacity))


def _inputs(n=3):
    return (
        torch.randn(n, 4, 16, 16),
        torch.tensor([0.01, 0.5, 0.9])[:n],
        Conditioning((torch.randn(n, 77, 32),)),
    )


def test_round_trip_preserves_weights_metadata_and_outputs(tmp_path):
    red = _redirector()
    path = tmp_path / "red.safetensors"
    digest = save_bundle(path, red, ConceptInfo("red", "nsfw", "test"), FP, {"accuracy": 0.99})
    assert digest == file_sha256(path)
    assert not list(tmp_path.glob("*.tmp")), "atomic write leaves no temporary file"
    bundle = load_bundle(path, sha256=digest, expected_backbone=FP)
    assert bundle.concept == ConceptInfo("red", "nsfw", "test")
    assert bundle.backbone == FP and bundle.training == {"accuracy": 0.99} and bundle.sha256 == digest
    assert bundle.config == red.config
    z, t, c = _inputs()
    for key, value in red.state_dict().items():
        assert torch.equal(value, bundle.redirector.state_dict()[key]), key
    red.eval().requires_grad_(False)
    a, b = red(z, t, c), bundle.redirector(z, t, c)
    assert torch.equal(a.logit, b.logit) and torch.equal(a.directions[0], b.directions[0])
    assert load_bundle(path, sha256=digest.upper()).sha256 == digest, "a pin is a hash, whatever its case"


def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path):
    """A written bundle (or report) is readable as any file the user writes: a new file gets the
    umask's mode (tempfile's 0600 would hide it from the group serving it), a replaced file keeps its
    own; a failed write leaves neither the file nor a temporary one."""
    import os
    import stat

    from saferedir_sdk.atomic import atomic_path, write_text_atomic

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    old = os.umask(0o022)
    try:
        new = tmp_path / "new.safetensors"
        save_bundle(new, _redirector(), ConceptInfo("red", "nsfw", "test"), FP, {})
        assert mode(new) == 0o644
        kept = tmp_path / "kept.json"
        write_text_atomic(kept, "{}")
        os.chmod(kept, 0o640)
        write_text_atomic(kept, "[]")
        assert mode(kept) == 0o640 and kept.read_text() == "[]"
        os.umask(0o077)
        write_text_atomic(tmp_path / "private.json", "{}")
        assert mode(tmp_path / "private.json") == 0o600
    finally:
        os.umask(old)
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "never.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "new.safetensors", "private.json"]


def test_bundle_for_another_token_dim_is_refused(tmp_path):
    path = tmp_path / "wide.safetensors"
    wide = fingerprint(dim=768)
    save_bundle(path, _redirector(dim=768), ConceptInfo("red", "nsfw"), wide)
    with pytest.raises(BackboneMismatchError) as info:
        load_bundle(path, expected_backbone=FP)
    assert (
        info.value.field == "streams" and "768" in str(info.value.expected) and "32" in str(info.value.actual)
    )
    assert str(path) in str(info.value)


def test_bundle_for_another_text_encoder_names_it(tmp_path):
    path = tmp_path / "red.safetensors"
    save_bundle(path, _redirector(), ConceptInfo("red", "nsfw"), FP)
    other = BackboneFingerprint(
        FP.streams, 0, 4, (TextEncoderPrint("text_encoder", "a" * 64, "c" * 64),), "sd1"
    )
    with pytest.raises(BackboneMismatchError, match=r"encoders\[text_encoder\]\.weights_sha256"):
        load_bundle(path, expected_backbone=other)


def test_truncated_file_is_a_format_error(tmp_path):
    path = tmp_path / "red.safetensors"
    save_bundle(path, _redirector(), ConceptInfo("red", "nsfw"), FP)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleFormatError, match="red.safetensors"):
        load_bundle(path)


@pytest.mark.parametrize(
    "payload", [b"", b"not a safetensors file at all", b"\x80\x04\x95pickle", b"\xff" * 64]
)
def test_non_safetensors_file_is_a_format_error(tmp_path, payload):
    path = tmp_path / "x.safetensors"
    path.write_bytes(payload)
    with pytest.raises(BundleFormatError, match="safetensors"):
        load_bundle(path)


def test_safetensors_without_saferedir_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(BundleFormatError, match="not a saferedir redirector bundle"):
        load_bundle(path)


def test_tensor_shape_that_does_not_match_the_config_is_refused(tmp_path):
    path = tmp_path / "red.safetensors"
    save_bundle(path, _redirector(), ConceptInfo("red", "nsfw"), FP)
    _rewrite_config(path, capacity={**SMALL.__dict__, "rank": 4})
    with pytest.raises(BundleFormatError, match="delta_down.weight"):
        load_bundle(path)


def _rewrite_config(path, **changes) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    config = json.loads(meta["saferedir.config"])
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    meta["saferedir.config"] = json.dumps(config)
    save_file(tensors, str(path), metadata=meta)


def _as_format_1(bundle_path, out) -> None:
    """Write what saferedir-sdk 0.1 wrote for the same redirector: one stream's tensors under the old
    names, a flat config and fingerprint, format version 1."""
    from safetensors import safe_open

    with safe_open(str(bundle_path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    renames = {
        "token_norms.0.": "token_norm.",
        "token_projs.0.": "token_proj.",
        "delta_ups.0.": "delta_up.",
        "positions.0": "position",
    }
    old = {}
    for key, value in tensors.items():
        for new, was in renames.items():
            if key.startswith(new):
                key = was + key[len(new) :]
        old[key] = value
    cfg = json.loads(meta["saferedir.config"])
    stream = cfg["streams"][0]
    meta["saferedir.version"] = "1"
    meta["saferedir.config"] = json.dumps(
        {
            "token_dim": stream["dim"],
            "seq_len": stream["seq_len"],
            "latent_channels": cfg["latent_channels"],
            "num_train_timesteps": 1000,
            **cfg["capacity"],
        }
    )
    meta["saferedir.backbone"] = json.dumps(
        {
            "token_dim": stream["dim"],
            "seq_len": stream["seq_len"],
            "latent_channels": 4,
            "tokenizer_sha256": "a" * 64,
            "text_encoder_sha256": "b" * 64,
            "family": "sd1",
        }
    )
    save_file(old, str(out), metadata=meta)


def test_format_1_bundle_is_refused_with_the_command_that_upgrades_it_exactly(tmp_path):
    new = tmp_path / "v2.safetensors"
    red = _redirector()
    save_bundle(new, red, ConceptInfo("red", "nsfw"), FP)
    old = tmp_path / "v1.safetensors"
    _as_format_1(new, old)
    with pytest.raises(BundleFormatError, match=r"format version 1 .*saferedir bundle upgrade"):
        load_bundle(old)
    upgraded = tmp_path / "up.safetensors"
    upgrade_bundle(old, upgraded)
    bundle = load_bundle(upgraded, expected_backbone=FP)
    z, t, c = _inputs()
    red.eval().requires_grad_(False)
    a, b = red(z, t, c), bundle.redirector(z, t, c)
    assert torch.equal(a.logit, b.logit) and torch.equal(a.directions[0], b.directions[0])
    assert torch.equal(a.masks[0], b.masks[0]) and torch.equal(a.alpha, b.alpha)
    with pytest.raises(BundleFormatError, match="not a format-1 bundle"):
        upgrade_bundle(upgraded, tmp_path / "again.safetensors")


def test_shipped_shapes_bundles_were_trained_on_outcomes_and_read_the_latent():
    """The Shapes pack's bundles: format 2, trajectories labelled by what their images show, and a
    held-out ablation in which the latent alone (the prompt replaced by the empty one) still
    decides the last timestep quarter (figures: benchmarks/README.md)."""
    from saferedir_shapes.plugin import CONCEPTS, bundle_path

    for concept, layout in [(c, layout) for c, _, _ in CONCEPTS.values() for layout in ("sd", "xl")]:
        bundle = load_bundle(bundle_path(concept, layout))
        assert bundle.config.pooled_dim == (384 if layout == "xl" else 0)
        training = bundle.training
        assert training["data"]["labels"] == f"shapes-judge:{concept}"
        assert bundle.config.capacity.latent_readout == "mean+max"
        ablation = training["heldout"]["heldout_ablation"]
        assert {"real", "shuffled_latent", "neutral_prompt"} <= set(ablation)
        assert ablation["neutral_prompt"]["t0.00-0.25"] >= 0.85, (concept, ablation)


def test_shipped_shapes_bundles_come_from_the_settings_of_train_concepts_sh():
    """``plugins/shapes/train_concepts.sh`` is the command that made the SD-layout bundles: each
    bundle records its three fits, with the script's training seed, steps and sampler seeds: the
    redirection (star's on its one-target recipe) with a classifier reading latent, timestep and
    prompt; a latent-only classifier with an encoder of its own, renoised, nothing else trainable;
    the redirection heads refitted and averaged with the second fit; striped's joined by two more
    classifier fits (wide-pool recipe, below t 0.5, seeds 0 1 and 0 1 2 3); red's classifier fitted
    a fourth time as the second was, on its 360-pair "descriptions" recipe with the spent held-out
    descriptions in its pool (red_handwritten_pairs.py), labelled by the pack's judge."""
    from saferedir_shapes.plugin import bundle_path

    script = (ROOT / "plugins" / "shapes" / "train_concepts.sh").read_text()
    specs = re.search(r"^for spec in (.+); do$", script, re.M).group(1).split()
    assert "--seeds 0 1 --steps 1200" in script and '--seed "$seed"' in script
    assert sorted(s.split(":")[0] for s in specs) == ["red", "star", "striped"]
    assert "star:object:1:one-target" in specs
    assert (
        "--trainable classifier" in script
        and "--classifier-reads latent --classifier-encoder own --renoise 0.5" in script
        and "--trainable redirection --steps 500 --average-init" in script
    )
    for spec in specs:
        concept, category, seed, _variant = spec.split(":")
        bundle = load_bundle(bundle_path(concept, "sd"))
        assert bundle.concept.category == category
        fits, node = [bundle.training["config"]], bundle.training["init"]
        while node:  # each fit's config, the last first
            fits.append(node["training_config"])
            node = node.get("init")
        if concept == "red":  # its classifier fitted again, on the descriptions recipe
            fourth = fits.pop(0)
            recorded = (
                fourth["seed"],
                fourth["steps"],
                fourth["seeds"],
                fourth["renoise"],
                fourth["trainable"],
            )
            assert recorded == (int(seed), 1200, [0, 1], 0.5, "classifier")
            data = bundle.training["data"]
            assert data["train_pairs"] + data["heldout_pairs"] == 360 and data["labels"] == "shapes-judge:red"
            # the recipe's 150 pool prompts and the 384 spent ones, a fifth of them held out by the split
            assert data["retain_pool"] == round(0.8 * (150 + 384))
            assert '--pairs "$stage/red-handwritten.json" \\\n      --outcome shapes-red' in script
        else:
            assert "fitted_heldout" in bundle.training["average_init"], concept
        assert len(fits) == 3, concept
        third, second, first = fits
        recorded = (third["seed"], third["steps"], third["seeds"], third["trainable"], third["average_init"])
        assert recorded == (int(seed), 500, [0, 1], "redirection", True), concept
        recorded = (second["seed"], second["steps"], second["seeds"], second["renoise"], second["trainable"])
        assert recorded == (int(seed), 1200, [0, 1], 0.5, "classifier"), concept
        capacity = bundle.config.capacity
        assert (capacity.classifier_reads, capacity.classifier_encoder) == ("latent", "own"), concept
        one = asdict(replace(capacity, classifier_members=1))
        assert {**one, "classifier_members": 1} == {"classifier_members": 1, **third["capacity"]}, concept
        assert third["capacity"] == second["capacity"], concept
        members = bundle.training.get("ensemble", {}).get("members", [])
        assert capacity.classifier_members == 1 + len(members), concept
        if concept == "striped":  # and two more classifiers: wide-pool recipe, t <= 0.5, two seed sets
            fits = [m["training"] for m in members]
            assert [f["config"]["seeds"] for f in fits] == [[0, 1], [0, 1, 2, 3]]
            for fit in fits:
                c = fit["config"]
                recorded = (c["seed"], c["steps"], c["renoise"], c["trainable"], c["classify_below"])
                assert recorded == (int(seed), 1200, 0.5, "classifier", 0.5)
                assert c["capacity"] == second["capacity"], concept
                # from the same first fit (recorded by a later SDK, which also records defaults)
                theirs = fit["init"]["training_config"]
                assert {k: v for k, v in first.items() if k != "capacity"}.items() <= theirs.items()
                assert first["capacity"].items() <= theirs["capacity"].items(), concept
                assert fit["data"]["retain_pool"] == 4 * bundle.training["data"]["retain_pool"]
        else:
            assert not members, concept
        assert (first["seed"], first["steps"], first["seeds"]) == (int(seed), 1200, [0, 1]), concept
        assert first["capacity"].get("classifier_reads", "latent+prompt") == "latent+prompt", concept
        assert first.get("renoise", 0.0) == 0.0, concept


def test_tensors_of_another_dtype_are_refused(tmp_path):
    path = tmp_path / "red.safetensors"
    save_bundle(path, _redirector(), ConceptInfo("red", "nsfw"), FP)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k).half() for k in fh.keys()}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(BundleFormatError, match="expected dtype float32"):
        load_bundle(path)


def test_wrong_sha256_pin_is_an_integrity_error(tmp_path):
    path = tmp_path / "red.safetensors"
    save_bundle(path, _redirector(), ConceptInfo("red", "nsfw"), FP)
    with pytest.raises(BundleIntegrityError) as info:
        load_bundle(path, sha256="0" * 64)
    assert info.value.actual == file_sha256(path)


def test_missing_file(tmp_path):
    with pytest.raises(BundleNotFoundError, match="nope.safetensors"):
        load_bundle(tmp_path / "nope.safetensors")


def test_policy_pins_are_checked_when_the_guard_is_built(write_policy, bundles):
    good = file_sha256(bundles["red"])
    ok = write_policy(
        [
            {
                "concept": "red",
                "category": "custom",
                "redirector": {"path": str(bundles["red"]), "sha256": good},
            }
        ]
    )
    assert SafeRedirGuard.from_policy(ok).concepts == ["red"]
    bad = write_policy(
        [
            {
                "concept": "red",
                "category": "custom",
                "redirector": {"path": str(bundles["red"]), "sha256": "1" * 64},
            }
        ]
    )
    with pytest.raises(GuardBuildError, match="sha256 mismatch") as info:
        SafeRedirGuard.from_policy(bad)
    assert isinstance(info.value.__cause__, BundleIntegrityError)


def test_unloadable_redirector_closed_refuses_open_records_fail_open(
    pipe, write_policy, audit_records, tmp_path
):
    concepts = [
        {
            "concept": "red",
            "category": "custom",
            "redirector": {"path": str(tmp_path / "missing.safetensors")},
        }
    ]
    with pytest.raises(GuardBuildError, match="concept 'red' cannot be enforced"):
        SafeRedirGuard.from_policy(write_policy(concepts))

    base = generate(pipe).images
    with pytest.warns(UserWarning, match="NOT enforced"):
        guard = SafeRedirGuard.from_policy(write_policy(concepts, fail_mode="open"))
    assert guard.concepts == [] and guard.fail_open[0]["concept"] == "red"
    guard.wrap(pipe)
    out = generate(pipe, prompts=[FORGET, RETAIN]).images
    assert (out == base).all()
    record = audit_records()[0]
    assert record["fail_mode"] == "open"
    assert record["fail_open"] == [{"concept": "red", "reason": record["fail_open"][0]["reason"]}]
    assert "BundleNotFoundError" in record["fail_open"][0]["reason"]


def test_relative_bundle_paths_resolve_against_the_policy_folder(tmp_path, bundles):
    (tmp_path / "b").mkdir()
    target = tmp_path / "b" / "red.safetensors"
    target.write_bytes(bundles["red"].read_bytes())
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nname: rel\naudit: {sinks: [stdout]}\nconcepts:\n"
        "  - {concept: red, category: custom, redirector: {path: b/red.safetensors}}\n"
    )
    assert SafeRedirGuard.from_policy(policy).concepts == ["red"]
