"""A custom pipeline class that no first-party adapter knows, guarded through an adapter a test
plugin registers (issue #13): the contract is enough for a third party's backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from helpers import FORGET, RETAIN, STEPS
from saferedir_adapters.sd import StableDiffusionAdapter
from saferedir_adapters.tiny import tiny_sd_pipeline

from saferedir_sdk import AdapterNotFoundError, SafeRedirGuard, hookimpl
from saferedir_sdk.conditioning import TokenStream
from saferedir_sdk.fingerprint import BackboneFingerprint, TextEncoderPrint, module_sha256, vocab_sha256
from saferedir_sdk.plugins import make_plugin_manager


class AcmePipeline(DiffusionPipeline):
    """Its own names (``denoiser``, ``encoder``, ``tok``) and its own loop: no SD adapter claims it."""

    def __init__(self, denoiser, encoder, tok, scheduler, vae):
        super().__init__()
        self.register_modules(denoiser=denoiser, encoder=encoder, tok=tok, scheduler=scheduler, vae=vae)

    @torch.no_grad()
    def __call__(self, prompt, num_inference_steps=4, guidance_scale=7.5, generator=None, output_type="np"):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = self.tok(
            prompts + [""] * len(prompts), padding="max_length", max_length=77, return_tensors="pt"
        )
        states = self.encoder(ids.input_ids)[0]
        cond, uncond = states[: len(prompts)], states[len(prompts) :]
        latents = torch.randn(len(prompts), 4, 32, 32, generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            eps = self.denoiser(
                torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])
            ).sample
            e_u, e_c = eps.chunk(2)
            latents = self.scheduler.step(e_u + guidance_scale * (e_c - e_u), t, latents).prev_sample
        return latents.numpy()


class AcmeAdapter(StableDiffusionAdapter):
    """The third party's adapter: the SD call layout, its pipeline's own component names."""

    name = "acme"

    @property
    def denoiser(self):
        return self.pipe.denoiser

    def components(self):
        return {"denoiser": self.pipe.denoiser, "encoder": self.pipe.encoder}

    def latent_channels(self):
        return 4

    def fingerprint(self):
        enc, tok = self.pipe.encoder, self.pipe.tok
        return BackboneFingerprint(
            streams=(TokenStream("text_encoder", 77, int(enc.config.hidden_size)),),
            pooled_dim=0,
            latent_channels=4,
            encoders=(TextEncoderPrint("text_encoder", vocab_sha256(tok.get_vocab()), module_sha256(enc)),),
            family=self.name,
        )

    def output_images(self, output):
        return output


class AcmePlugin:
    @hookimpl
    def saferedir_make_adapter(self, pipeline):
        return AcmeAdapter(pipeline) if isinstance(pipeline, AcmePipeline) else None


def _acme():
    sd = tiny_sd_pipeline(0)
    pipe = AcmePipeline(sd.unet, sd.text_encoder, sd.tokenizer, sd.scheduler, sd.vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe):
    return pipe([FORGET, RETAIN], num_inference_steps=STEPS, generator=torch.Generator().manual_seed(3))


def test_a_third_party_adapter_guards_its_own_pipeline_class(write_policy, audit_records):
    pipe = _acme()
    with pytest.raises(AdapterNotFoundError, match="AcmePipeline"):
        SafeRedirGuard.from_policy(write_policy(), plugin_manager=make_plugin_manager()).wrap(pipe)
    pm = make_plugin_manager()
    pm.register(AcmePlugin(), name="acme")
    guard = SafeRedirGuard.from_policy(write_policy(), plugin_manager=pm)  # the red bundle of tiny SD seed 0
    unguarded = _run(pipe)
    guard.wrap(pipe)
    guarded = _run(pipe)
    assert [s.action for s in guard.last_report.samples] == ["redirected", "none"]
    assert np.array_equal(guarded[1], unguarded[1]) and not np.array_equal(guarded[0], unguarded[0])
    (record,) = audit_records()
    assert record["adapter"]["adapter"] == "acme" and record["adapter"]["pipeline"] == "AcmePipeline"
