"""Bundle files: round trip and every typed failure."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FORGET, RETAIN, generate
from safetensors.torch import save_file

from saferedir_sdk import (
    BackboneFingerprint,
    BackboneMismatchError,
    BundleFormatError,
    BundleIntegrityError,
    BundleNotFoundError,
    ConceptInfo,
    GuardBuildError,
    Redirector,
    RedirectorConfig,
    SafeRedirGuard,
    load_bundle,
    save_bundle,
)
from saferedir_sdk.bundle import file_sha256

FP = BackboneFingerprint(token_dim=32, seq_len=77, latent_channels=4, tokenizer_sha256="a" * 64,
                         text_encoder_sha256="b" * 64, family="sd1")


def _redirector(token_dim=32, seq_len=77) -> Redirector:
    torch.manual_seed(0)
    return Redirector(RedirectorConfig(token_dim, seq_len, 4, hidden_dim=64, rank=8, latent_pool=8))


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
    z, t, e = torch.randn(3, 4, 16, 16), torch.tensor([10, 500, 900]), torch.randn(3, 77, 32)
    for key, value in red.state_dict().items():
        assert torch.equal(value, bundle.redirector.state_dict()[key]), key
    red.eval().requires_grad_(False)
    for a, b in zip(red(z, t, e), bundle.redirector(z, t, e)):
        assert torch.equal(a, b)


def test_bundle_for_another_token_dim_is_refused(tmp_path):
    path = tmp_path / "wide.safetensors"
    wide = BackboneFingerprint(**{**FP.to_dict(), "token_dim": 768})
    save_bundle(path, _redirector(token_dim=768), ConceptInfo("red", "nsfw"), wide)
    with pytest.raises(BackboneMismatchError) as info:
        load_bundle(path, expected_backbone=FP)
    assert info.value.field == "token_dim" and info.value.expected == 768 and info.value.actual == 32
    assert str(path) in str(info.value)


def test_truncated_file_is_a_format_error(tmp_path):
    path = tmp_path / "red.safetensors"
    save_bundle(path, _redirector(), ConceptInfo("red", "nsfw"), FP)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleFormatError, match="red.safetensors"):
        load_bundle(path)


@pytest.mark.parametrize("payload", [b"", b"not a safetensors file at all", b"\x80\x04\x95pickle", b"\xff" * 64])
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
    _rewrite_config(path, rank=4)
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


def test_bundle_written_before_token_layers_existed_loads_without_them(tmp_path):
    torch.manual_seed(0)
    old = Redirector(RedirectorConfig(32, 77, 4, hidden_dim=64, rank=8, latent_pool=8, token_layers=0))
    path = tmp_path / "old.safetensors"
    save_bundle(path, old, ConceptInfo("red", "nsfw"), FP)
    _rewrite_config(path, token_layers=None)  # its config did not record the field
    bundle = load_bundle(path)
    assert bundle.config.token_layers == 0 and not hasattr(bundle.redirector, "copy_gate")
    z, t, e = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    old.eval().requires_grad_(False)  # as loaded bundles are (attention takes the same kernels)
    assert torch.equal(old(z, t, e).direction, bundle.redirector(z, t, e).direction)
    # the same file claiming token layers is refused: the tensors do not match that architecture
    _rewrite_config(path, token_layers=1)
    with pytest.raises(BundleFormatError, match="missing"):
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
    ok = write_policy([{"concept": "red", "category": "custom", "redirector": {"path": str(bundles["red"]), "sha256": good}}])
    assert SafeRedirGuard.from_policy(ok).concepts == ["red"]
    bad = write_policy([{"concept": "red", "category": "custom",
                         "redirector": {"path": str(bundles["red"]), "sha256": "1" * 64}}])
    with pytest.raises(GuardBuildError, match="sha256 mismatch") as info:
        SafeRedirGuard.from_policy(bad)
    assert isinstance(info.value.__cause__, BundleIntegrityError)


def test_unloadable_redirector_closed_refuses_open_records_fail_open(pipe, write_policy, audit_records, tmp_path):
    concepts = [{"concept": "red", "category": "custom", "redirector": {"path": str(tmp_path / "missing.safetensors")}}]
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
    policy.write_text("version: 1\nname: rel\naudit: {sinks: [stdout]}\nconcepts:\n"
                      "  - {concept: red, category: custom, redirector: {path: b/red.safetensors}}\n")
    assert SafeRedirGuard.from_policy(policy).concepts == ["red"]
