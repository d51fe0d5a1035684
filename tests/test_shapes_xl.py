"""The Shapes-XL backbone: SDXL's conditioning layout (tokens + MiniLM's pooled sentence embedding
through ``add_embedding``) on the Shapes UNet, guarded by the SDXL adapter with its own bundles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import UNetRecorder
from saferedir_shapes.judge import judge_images, load_judge
from saferedir_shapes.pipeline import TIME_IDS, WEIGHTS, load_shapes_pipeline, new_unet
from saferedir_shapes.text import sentence_embeddings
from saferedir_shapes.train_backbone import initial_unet
from safetensors.torch import load_file

from saferedir_sdk import SafeRedirGuard
from saferedir_sdk.errors import BackboneMismatchError
from saferedir_sdk.plugins import default_plugin_manager, find_adapter


@pytest.fixture(scope="module")
def xl_pipe():
    return load_shapes_pipeline(layout="xl")


def test_the_sdxl_adapter_claims_shapes_xl_with_its_pooled_width(xl_pipe):
    adapter = find_adapter(default_plugin_manager(), xl_pipe)
    fingerprint = adapter.fingerprint()
    assert adapter.name == "sdxl" and fingerprint.family == "sdxl"
    assert [(s.name, s.seq_len, s.dim) for s in fingerprint.streams] == [("text_encoder_2", 24, 384)]
    assert fingerprint.pooled_dim == 384
    # the SD-layout backbone's bundles do not fit it
    with pytest.raises(BackboneMismatchError):
        SafeRedirGuard.from_policy("shapes:demo").wrap(xl_pipe)


def test_the_pooled_embedding_is_minilms_sentence_embedding(xl_pipe):
    prompts = ["a red star", "two blue squares on a white background"]
    tokens, negative, pooled, negative_pooled = xl_pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True
    )
    assert tokens.shape == (2, 24, 384) and pooled.shape == (2, 384)
    torch.testing.assert_close(
        pooled, sentence_embeddings(xl_pipe.text_encoder_2, xl_pipe.tokenizer_2, prompts)
    )
    torch.testing.assert_close(
        negative_pooled[0], sentence_embeddings(xl_pipe.text_encoder_2, xl_pipe.tokenizer_2, [""])[0]
    )
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        xl_pipe.encode_prompt(None, prompt_embeds=tokens)


def test_an_xl_unet_started_from_the_sd_weights_draws_exactly_as_the_sd_backbone():
    sd = new_unet()
    sd.load_state_dict({k: v.float() for k, v in load_file(str(WEIGHTS / "shapes-unet.safetensors")).items()})
    xl = initial_unet("xl", WEIGHTS / "shapes-unet.safetensors")
    x, t, tokens = torch.randn(2, 12, 16, 16), torch.tensor([900, 100]), torch.randn(2, 24, 384)
    added = {"text_embeds": torch.randn(2, 384), "time_ids": torch.tensor([TIME_IDS] * 2)}
    with torch.no_grad():
        assert torch.equal(sd(x, t, tokens).sample, xl(x, t, tokens, added_cond_kwargs=added).sample)


def test_the_xl_backbone_draws_from_its_pooled_embedding_alone(xl_pipe):
    """The pooled embedding carries the prompt on its own (tokens: the empty prompt's), which is why
    leaving it alone could leak a concept (figures: python -m saferedir_shapes.evaluate --layout xl --only pooled)."""
    colours = ["red", "green", "blue", "yellow"]
    prompts = [f"a {c} {s}" for c in colours for s in ("circle", "square", "cross")]
    _, _, pooled, _ = xl_pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    empty, _, _, _ = xl_pipe.encode_prompt([""] * len(prompts), do_classifier_free_guidance=False)
    images = xl_pipe(
        prompt_embeds=empty,
        pooled_prompt_embeds=pooled,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    seen = judge_images(load_judge(), images)
    colour = np.mean([p.split()[1] == c for p, c in zip(prompts, seen["colour"])])
    assert colour >= 0.5, (colour, seen["colour"])  # 10 of 12 here; ignoring it: about 1 in 6


def test_shapes_xl_policy_redirects_tokens_and_pooled_of_the_flagged_sample_only(xl_pipe):
    """Seed 3 is also a released trigger: red's classifier stops seeing red once redirected and
    releases the sample before the trigger is confirmed, so the last steps run unmoved; the image
    came out purple all the same, and the record must say the sample was redirected."""
    prompts = ["a red circle", "a blue square"]
    base_rec = UNetRecorder(xl_pipe.unet)
    base = xl_pipe(prompts, generator=torch.Generator().manual_seed(3), output_type="np").images
    base_rec.remove()
    guard = SafeRedirGuard.from_policy("shapes:xl")
    guard.wrap(xl_pipe)
    try:
        rec = UNetRecorder(xl_pipe.unet)  # registered after the guard's hook: sees what the UNet gets
        out = xl_pipe(prompts, generator=torch.Generator().manual_seed(3), output_type="np").images
        rec.remove()
    finally:
        guard.unwrap(xl_pipe)
    red = guard.last_report.samples[0].concepts[0]
    assert red.concept == "red" and red.applied and not red.triggered
    assert [s.action for s in guard.last_report.samples] == ["redirected", "none"]
    assert np.array_equal(out[1], base[1])
    # batch [uncond red, uncond blue, cond red, cond blue]: only row 2 changes, tokens and pooled
    for key in ("ehs", "pooled"):
        changed = [
            any(not torch.equal(a[key][row], b[key][row]) for a, b in zip(base_rec.calls, rec.calls))
            for row in range(4)
        ]
        assert changed == [False, False, True, False], key
    seen = judge_images(load_judge(), (out * 255).round().astype(np.uint8))
    assert seen["colour"][0] != "red" and seen["shape"][0] == "circle", seen
