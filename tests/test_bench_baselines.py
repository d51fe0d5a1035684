"""The alternatives the efficacy benchmark compares SafeRedir with (the benchmark plugin)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipelineSafe
from saferedir_adapters.sd import StableDiffusionAdapter
from saferedir_bench.baselines import KeywordBlocklist, LeaceEmbeddingEraser, SafeLatentGuidance, SLDConfig

from saferedir_sdk import Conditioning
from saferedir_sdk.errors import SafeRedirError


@pytest.mark.parametrize("preset", ["medium", "max"])
def test_sld_hook_matches_diffusers_stable_diffusion_pipeline_safe(pipe, preset):
    """The hook on a plain SD pipeline gives diffusers' own SLD images (same seed, same concept)."""
    concept = "red apple"
    safe = StableDiffusionPipelineSafe(
        **{k: v for k, v in pipe.components.items() if k != "image_encoder"}, requires_safety_checker=False
    )
    safe.set_progress_bar_config(disable=True)
    safe.safety_concept = concept
    cfg = SLDConfig.preset(preset, num_inference_steps=6)
    kwargs = dict(num_inference_steps=6, guidance_scale=7.5, output_type="np")
    ref = safe(
        "a red apple on a table",
        generator=torch.Generator().manual_seed(3),
        sld_guidance_scale=cfg.guidance_scale,
        sld_warmup_steps=cfg.warmup_steps,
        sld_threshold=cfg.threshold,
        sld_momentum_scale=cfg.momentum_scale,
        sld_mom_beta=cfg.mom_beta,
        **kwargs,
    ).images
    adapter = StableDiffusionAdapter(pipe)
    sld = SafeLatentGuidance(adapter.encode_prompts([concept])[0], cfg)
    with sld.active(adapter, batch_size=1):
        ours = pipe("a red apple on a table", generator=torch.Generator().manual_seed(3), **kwargs).images
    plain = pipe("a red apple on a table", generator=torch.Generator().manual_seed(3), **kwargs).images
    # SLD changed the image, as diffusers' pipeline does (it batches the safety branch with the
    # others; we run it separately, so float rounding differs by ~1e-6 and eq. 6's hard threshold
    # flips a few elements)
    assert abs(ref - plain).mean() > 100 * abs(ref - ours).mean()
    assert abs(ref - ours).max() < 1e-2
    after = pipe("a red apple on a table", generator=torch.Generator().manual_seed(3), **kwargs).images
    assert (after == plain).all()  # the hook is gone after the block


def test_sld_rejects_a_batch_of_concepts_and_unknown_presets():
    with pytest.raises(SafeRedirError, match="one safety concept, got a batch of 2"):
        SafeLatentGuidance(Conditioning((torch.zeros(2, 4, 8),)))
    with pytest.raises(SafeRedirError, match="unknown SLD preset 'mild'"):
        SLDConfig.preset("mild")
    assert SLDConfig.preset("medium", num_inference_steps=20).warmup_steps == 4


def test_keyword_blocklist_matches_whole_words_only():
    blocklist = KeywordBlocklist(["red", "brick red"])
    assert blocklist.blocks("a Red circle") and blocklist.blocks("brick red star, striped")
    assert (
        not blocklist.blocks("a reddish circle")
        and not blocklist.blocks("a bored cat")
        and not blocklist.blocks("a tred")
    )
    with pytest.raises(SafeRedirError, match="no words"):
        KeywordBlocklist([" "])


def test_leace_removes_the_linear_concept_signal_from_token_embeddings():
    pytest.importorskip("concept_erasure")
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(16, generator=g)
    benign = torch.randn(64, 5, 16, generator=g)
    concept = torch.randn(64, 5, 16, generator=g) + 3 * direction
    eraser = LeaceEmbeddingEraser.fit(Conditioning((concept,)), Conditioning((benign,)))
    erased = lambda x: eraser(Conditioning((x,))).tokens[0]  # noqa: E731
    gap_before = (concept.mean((0, 1)) - benign.mean((0, 1))).norm()
    gap_after = (erased(concept).mean((0, 1)) - erased(benign).mean((0, 1))).norm()
    assert gap_before > 10 and gap_after < 1e-3 * gap_before


def test_sld_state_restarts_with_every_block_of_any_batch_size(pipe):
    """A call guided in its own block (batch 2, then batch 1) gives that call's own SLD images:
    momentum and warm-up do not leak from one call into the next."""
    adapter = StableDiffusionAdapter(pipe)
    sld = SafeLatentGuidance(
        adapter.encode_prompts(["red"])[0], SLDConfig.preset("max", num_inference_steps=4)
    )
    kwargs = dict(num_inference_steps=4, output_type="np")
    with sld.active(adapter, batch_size=2):
        pipe(["a red circle", "a blue moon"], generator=torch.Generator().manual_seed(0), **kwargs)
    with sld.active(adapter, batch_size=1):
        second = pipe("a tan dot", generator=torch.Generator().manual_seed(1), **kwargs).images
    fresh = SafeLatentGuidance(
        adapter.encode_prompts(["red"])[0], SLDConfig.preset("max", num_inference_steps=4)
    )
    with fresh.active(adapter, batch_size=1):
        alone = pipe("a tan dot", generator=torch.Generator().manual_seed(1), **kwargs).images
    plain = pipe("a tan dot", generator=torch.Generator().manual_seed(1), **kwargs).images
    assert (second == alone).all() and not (alone == plain).all()
