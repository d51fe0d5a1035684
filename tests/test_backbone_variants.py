"""Backbone variants (issue #13): training from SD 2.x and SDXL pipeline folders through the
adapter, and pre-unlearned backbones (an edited UNet or text encoder loaded from safetensors)."""

from __future__ import annotations

import pytest
import torch
from helpers import FORGET, RETAIN, UNetRecorder, generate, write_red_pairs
from saferedir_adapters.loading import load_component_weights
from saferedir_adapters.tiny import tiny_adapter, tiny_sd_pipeline, tiny_sdxl_pipeline
from safetensors.torch import save_file

from saferedir_sdk import BackboneMismatchError, SafeRedirGuard, load_bundle
from saferedir_sdk.cli import main
from saferedir_sdk.errors import ComponentWeightsError
from saferedir_sdk.plugins import load_backbone, make_plugin_manager

BUILDERS = {
    "sd2-v": lambda: tiny_sd_pipeline(0, token_dim=48, prediction_type="v_prediction"),
    "sdxl": lambda: tiny_sdxl_pipeline(0),
    "sdxl --no-pooled": lambda: tiny_sdxl_pipeline(0),
}


@pytest.mark.parametrize("family", BUILDERS)
def test_saferedir_train_collects_through_the_adapter_for_every_family(family, tmp_path, write_policy):
    folder = tmp_path / family.split()[0]
    BUILDERS[family]().save_pretrained(folder)
    pairs = write_red_pairs(tmp_path / "red.jsonl")
    out = tmp_path / "red.safetensors"
    args = [
        *f"train --backbone {folder} --concept red --pairs {pairs} --out {out} --seeds 0 1".split(),
        *"--sampler-steps 4 --guidance 7.5 --steps 100 --batch-size 32 --patience 0".split(),
        *"--hidden-dim 64 --rank 8 --latent-pool 8 --token-layers 0 --quiet --no-cache".split(),
        *family.split()[1:],
    ]
    assert main(args) == 0
    bundle = load_bundle(out)
    pipe = load_backbone(make_plugin_manager(), str(folder))
    assert bundle.backbone.first_difference(tiny_adapter(pipe).fingerprint()) is None
    assert bundle.backbone.family == ("sdxl" if family.startswith("sdxl") else "sd1")
    assert bundle.config.pooled_dim == (32 if family == "sdxl" else 0)
    plain = UNetRecorder(pipe.unet)
    generate(pipe, prompts=[FORGET, RETAIN], guidance_scale=7.5)
    plain.remove()
    guard = SafeRedirGuard.from_policy(
        write_policy([{"concept": "red", "category": "custom", "redirector": {"path": str(out)}}])
    )
    guard.wrap(pipe)
    seen = UNetRecorder(pipe.unet)
    generate(pipe, prompts=[FORGET, RETAIN], guidance_scale=7.5)
    seen.remove()
    assert [s.action for s in guard.last_report.samples] == ["redirected", "none"]
    assert not torch.equal(plain.calls[-1]["ehs"], seen.calls[-1]["ehs"])
    if family.startswith("sdxl"):  # the pooled embedding moves unless trained --no-pooled
        moved = not torch.equal(plain.calls[-1]["pooled"], seen.calls[-1]["pooled"])
        assert moved == (family == "sdxl")


def _edited(module, tmp_path, name, scale=0.02):
    """An edited copy of ``module``'s weights (what ESD/UCE/AdvUnlearn ship), as safetensors."""
    gen = torch.Generator().manual_seed(5)
    state = {
        k: (v + scale * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v).contiguous()
        for k, v in module.state_dict().items()
    }
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    return path


def test_an_edited_unet_keeps_bundles_valid_and_the_record_names_its_hash(
    pipe, tmp_path, write_policy, audit_records
):
    original = SafeRedirGuard.from_policy(write_policy())
    original.wrap(pipe)
    generate(pipe)
    original.unwrap(pipe)
    load_component_weights(pipe, "unet", _edited(pipe.unet, tmp_path, "esd-unet"))
    guard = SafeRedirGuard.from_policy(write_policy())
    guard.wrap(pipe)  # the fingerprint names the text encoder, not the UNet: the bundle still fits
    generate(pipe)
    assert guard.last_report.outcome == "redirected"
    before, after = audit_records()
    assert before["components"]["unet"] != after["components"]["unet"]
    assert before["components"]["text_encoder"] == after["components"]["text_encoder"]


def test_an_edited_text_encoder_is_refused_unless_the_policy_says_warn(
    pipe, tmp_path, write_policy, audit_records
):
    load_component_weights(pipe, "text_encoder", _edited(pipe.text_encoder, tmp_path, "advunlearn-te", 0.002))
    with pytest.raises(BackboneMismatchError, match=r"encoders\[text_encoder\].weights_sha256"):
        SafeRedirGuard.from_policy(write_policy()).wrap(pipe)
    guard = SafeRedirGuard.from_policy(write_policy(defaults={"encoder_mismatch": "warn"}))
    with pytest.warns(UserWarning, match="trained for other 'text_encoder' weights"):
        guard.wrap(pipe)
    generate(pipe)
    assert guard.last_report.samples[0].concepts[0].checks > 0  # enforced, not skipped
    (record,) = audit_records()
    (entry,) = record["backbone_mismatch"]
    assert entry["concept"] == "red" and entry["encoder"] == "text_encoder"
    assert entry["pipeline"] == record["components"]["text_encoder"] != entry["bundle"]
    guard.unwrap(pipe)
    # fail_mode open, encoder_mismatch error: the concept fails open, and every record says so
    lenient = SafeRedirGuard.from_policy(write_policy(fail_mode="open"))
    with pytest.warns(UserWarning, match="NOT enforced"):
        lenient.wrap(pipe)
    generate(pipe)
    assert "weights_sha256" in audit_records()[-1]["fail_open"][0]["reason"]


def test_an_edited_tokenizer_or_shape_is_never_waved_through(tmp_path, write_policy):
    other = tiny_sd_pipeline(0, token_dim=48)  # other token width: cannot be enforced at all
    guard = SafeRedirGuard.from_policy(write_policy(defaults={"encoder_mismatch": "warn"}))
    with pytest.raises(BackboneMismatchError, match="streams"):
        guard.wrap(other)


def test_component_weights_are_checked_before_anything_changes(pipe, tmp_path, write_policy):
    good = _edited(pipe.unet, tmp_path, "unet")
    state = dict(pipe.unet.state_dict())
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in list(state.items())[:-1]}, str(partial))
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ComponentWeightsError, match=r"partial.safetensors: 1 tensor\(s\) missing for unet"):
        load_component_weights(pipe, "unet", partial)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ComponentWeightsError, match="not a safetensors file"):
        load_component_weights(pipe, "unet", tmp_path / "junk.safetensors")
    with pytest.raises(ComponentWeightsError, match="no module 'transformer'"):
        load_component_weights(pipe, "transformer", good)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    SafeRedirGuard.from_policy(write_policy()).wrap(pipe)
    with pytest.raises(ComponentWeightsError, match="unwrap it, load, wrap again"):
        load_component_weights(pipe, "unet", good)
