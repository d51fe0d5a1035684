"""Conditioning beside the prompt: an IP-Adapter image prompt (SD, SDXL), GLIGEN's grounding phrases,
unCLIP's image embedding of the prompt. The redirector moves the prompt's conditioning only; a
concept carried by one of these would reach a sample the record calls redirected. The guard
withholds them (zeros: what the pipelines feed as their absence) from the rows of every sample whose
prompt it moves, at the steps it moves it, and records their names; every other row, and every
call that moves nothing, is untouched.

The pipelines are tiny random-weights ones built offline (the IP-Adapter weights too, as diffusers'
own tests make them), sharing the text encoders of the families' redirectors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    PriorTransformer,
    StableDiffusionGLIGENPipeline,
    StableUnCLIPPipeline,
)
from diffusers.models.attention_processor import IPAdapterAttnProcessor
from diffusers.models.embeddings import ImageProjection
from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
from helpers import FORGET, RETAIN, STEPS
from saferedir_adapters.sd import StableDiffusionAdapter
from saferedir_adapters.tiny import char_clip_tokenizer, tiny_clip, tiny_sd_pipeline
from saferedir_adapters.tiny import tiny_sdxl_pipeline as tiny_sdxl

from saferedir_sdk import SafeRedirGuard
from saferedir_sdk.errors import TensorShapeError


class _Recorder:
    """Every UNet call's keyword arguments, cloned (registered after the guard's hook)."""

    def __init__(self, unet):
        self.calls: list[dict] = []
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        self.calls.append(_clone({**kwargs, "class_labels": kwargs.get("class_labels")}))

    def remove(self):
        self.handle.remove()


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list | tuple):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _ip_adapter_weights(unet, seed: int = 3) -> dict:
    """Random IP-Adapter weights for ``unet`` in the layout ``_load_ip_adapter_weights`` reads
    (diffusers' tests/models/unets/test_models_unet_2d_condition.py ``create_ip_adapter_state_dict``)."""
    torch.manual_seed(seed)
    cross, key = {}, 1
    channels = unet.config.block_out_channels
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name[len("up_blocks.")])]
        else:
            hidden = channels[int(name[len("down_blocks.")])]
        sd = IPAdapterAttnProcessor(
            hidden_size=hidden, cross_attention_dim=unet.config.cross_attention_dim
        ).state_dict()
        cross.update(
            {f"{key}.to_k_ip.weight": sd["to_k_ip.0.weight"], f"{key}.to_v_ip.weight": sd["to_v_ip.0.weight"]}
        )
        key += 2
    dim = unet.config.cross_attention_dim
    proj = ImageProjection(cross_attention_dim=dim, image_embed_dim=dim, num_image_text_embeds=4).state_dict()
    image_proj = {
        "proj.weight": proj["image_embeds.weight"],
        "proj.bias": proj["image_embeds.bias"],
        "norm.weight": proj["norm.weight"],
        "norm.bias": proj["norm.bias"],
    }
    return {"image_proj": image_proj, "ip_adapter": cross}


def _ip_adapter_pipeline(family: str):
    pipe = tiny_sdxl(0) if family == "sdxl" else tiny_sd_pipeline(0)
    pipe.unet._load_ip_adapter_weights([_ip_adapter_weights(pipe.unet)])
    pipe.set_ip_adapter_scale(1.0)
    dim = pipe.unet.config.cross_attention_dim
    image = torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(5))
    # one image prompt for the call, [negative; positive] as diffusers takes it with CFG
    return pipe, {"ip_adapter_image_embeds": [torch.cat([torch.zeros_like(image), image])]}


def _gligen_pipeline(family: str):
    base = tiny_sd_pipeline(0, unet_config={"attention_type": "gated"})
    parts = {k: base.components[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")}
    pipe = StableDiffusionGLIGENPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    extra = {"gligen_phrases": ["a red star"], "gligen_boxes": [[0.1, 0.1, 0.6, 0.6]]}
    return pipe, {**extra, "gligen_scheduled_sampling_beta": 1.0}


def _unclip_pipeline(family: str):
    """StableUnCLIP: the prompt also goes through a prior to an image embedding, which reaches the
    UNet as ``class_labels`` (a projection class embedding)."""
    projected = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": 64}
    base = tiny_sd_pipeline(0, unet_config=projected)
    pipe = StableUnCLIPPipeline(
        prior_tokenizer=char_clip_tokenizer(),
        prior_text_encoder=tiny_clip(1, 32, 77, projection_dim=32),
        prior=PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=32, num_layers=1),
        prior_scheduler=DDPMScheduler(
            variance_type="fixed_small_log",
            prediction_type="sample",
            clip_sample=True,
            clip_sample_range=5.0,
            beta_schedule="squaredcos_cap_v2",
        ),
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=32),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=base.tokenizer,
        text_encoder=base.text_encoder,
        unet=base.unet,
        scheduler=base.scheduler,
        vae=base.vae,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"prior_num_inference_steps": 2}


def _ip_rows(call):
    return call["added_cond_kwargs"]["image_embeds"][0]


def _gligen_rows(call):
    return torch.cat([t.flatten(1) for t in call["cross_attention_kwargs"]["gligen"].values()], dim=1)


def _unclip_rows(call):
    return call["class_labels"]


# case -> (family, builder, the side conditioning's rows of a recorded call, its recorded name)
CASES = {
    "sd1 IP-Adapter": ("sd1", _ip_adapter_pipeline, _ip_rows, "added_cond_kwargs['image_embeds']"),
    "sdxl IP-Adapter": ("sdxl", _ip_adapter_pipeline, _ip_rows, "added_cond_kwargs['image_embeds']"),
    "sd1 GLIGEN": ("sd1", _gligen_pipeline, _gligen_rows, "cross_attention_kwargs['gligen']"),
    "sd1 unCLIP": ("sd1", _unclip_pipeline, _unclip_rows, "class_labels"),
}


def _policy(tmp_path, bundle: str, **rule):
    doc = {
        "version": 1,
        "name": "side",
        "audit": {"sinks": ["file"], "file": str(tmp_path / "audit.jsonl")},
        "concepts": [{"concept": "red", "category": "custom", "redirector": {"path": bundle}, **rule}],
    }
    (tmp_path / "policy.json").write_text(json.dumps(doc))
    return tmp_path / "policy.json"


def _run(pipe, extra, prompts=(FORGET, RETAIN)):
    recorder = _Recorder(pipe.unet)
    try:
        images = pipe(
            list(prompts),
            num_inference_steps=STEPS,
            output_type="np",
            generator=torch.Generator().manual_seed(7),
            **extra,
        ).images
    finally:
        recorder.remove()
    return images, recorder.calls


@pytest.mark.parametrize("case", CASES)
def test_side_conditioning_is_withheld_from_the_redirected_sample_only(case, family_bundles, tmp_path):
    family, build, rows_of, name = CASES[case]
    pipe, extra = build(family)
    unguarded, plain = _run(pipe, extra)
    guard = SafeRedirGuard.from_policy(_policy(tmp_path, family_bundles[family]))
    guard.wrap(pipe)
    guarded, seen = _run(pipe, extra)
    report = guard.last_report
    assert [s.action for s in report.samples] == ["redirected", "none"], case
    assert report.side_conditioning == [name]
    assert len(seen) == len(plain) == STEPS
    moved_steps = 0
    for step, (now, before) in enumerate(zip(seen, plain)):
        # rows: [uncond red, uncond tan, cond red, cond tan]
        side, original = rows_of(now), rows_of(before)
        assert original[2].abs().sum() > 0, (
            case,
            step,
            "the image prompt reaches the flagged sample unguarded",
        )
        moved = not torch.equal(now["encoder_hidden_states"][2], before["encoder_hidden_states"][2])
        moved_steps += moved
        assert torch.equal(side[2], torch.zeros_like(side[2]) if moved else original[2]), (case, step)
        assert torch.equal(side[[0, 1, 3]], original[[0, 1, 3]]), (case, step, "rows not moved")
    assert moved_steps > 0
    assert np.array_equal(guarded[1], unguarded[1]), f"{case}: the benign sample changed"
    assert not np.array_equal(guarded[0], unguarded[0])
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["event"] == "saferedir.generation"]
    assert record["side_conditioning"] == [name] and record["outcome"] == "redirected"

    # a call that moves nothing is the unguarded call, bit for bit, image prompt and all
    alone, _ = _run(pipe, extra, prompts=(RETAIN, RETAIN))
    guard.unwrap(pipe)
    assert np.array_equal(alone, _run(pipe, extra, prompts=(RETAIN, RETAIN))[0]), case


def test_with_rewind_the_side_conditioning_is_withheld_from_the_first_step_of_the_second_run(
    family_bundles, tmp_path
):
    pipe, extra = _ip_adapter_pipeline("sd1")
    _, plain = _run(pipe, extra)
    policy = _policy(tmp_path, family_bundles["sd1"], rewind=True, sticky=True, confirm_checks=1)
    guard = SafeRedirGuard.from_policy(policy)
    guard.wrap(pipe)
    _, seen = _run(pipe, extra)
    report = guard.last_report
    assert report.rehearsed_steps > 0 and report.samples[0].concepts[0].rewound
    first_run, second_run = seen[: report.rehearsed_steps], seen[report.rehearsed_steps :]
    for now, before in zip(first_run, plain):  # deciding on the trajectory the unguarded model takes
        assert torch.equal(_ip_rows(now), _ip_rows(before))
    assert len(second_run) == STEPS
    for now, before in zip(second_run, plain):
        assert torch.equal(_ip_rows(now)[2], torch.zeros_like(_ip_rows(now)[2]))
        assert torch.equal(_ip_rows(now)[[0, 1, 3]], _ip_rows(before)[[0, 1, 3]])


def _side_call(rows: int) -> dict:
    """A UNet call's keyword arguments: ``rows`` samples carrying one image prompt of ones."""
    return {
        "sample": torch.zeros(rows, 4, 8, 8),
        "added_cond_kwargs": {"image_embeds": [torch.ones(rows, 1, 32)]},
    }


def test_side_conditioning_rows_follow_the_batch_layout_and_an_unbatched_one_is_an_error_naming_it():
    adapter = StableDiffusionAdapter(tiny_sd_pipeline(0))
    moved, still = torch.tensor([True, False]), torch.tensor([False, False])
    layouts = {
        2: (None, [0.0, 1.0]),
        4: (still, [1.0, 1.0, 0.0, 1.0]),
        6: (still, [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]),
    }
    for rows, (moved_uncond, expected) in layouts.items():  # no CFG, [uncond; cond], PAG [uncond; cond; cond]
        kwargs = _side_call(rows)
        assert adapter.side_conditioning((), kwargs) == ["added_cond_kwargs['image_embeds']"]
        _, out = adapter.withhold_side_conditioning((), kwargs, moved, moved_uncond)
        assert out["added_cond_kwargs"]["image_embeds"][0][:, 0, 0].tolist() == expected, rows
        assert kwargs["added_cond_kwargs"]["image_embeds"][0].sum() == rows * 32, (
            "the caller's tensor is unwritten"
        )
    kwargs = {**_side_call(4), "added_cond_kwargs": {"image_embeds": [torch.ones(3, 1, 32)]}}
    with pytest.raises(TensorShapeError, match=r"added_cond_kwargs\['image_embeds'\]\[0\]"):
        adapter.withhold_side_conditioning((), kwargs, moved, still)
