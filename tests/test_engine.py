"""The engine: per-sample decisions, no host reads inside a step, deterministic combination."""

from __future__ import annotations

import pytest
import torch
from conftest import RED_PAIRS, STAR_PAIRS, STEPS
from hypothesis import given, settings
from hypothesis import strategies as st

from saferedir_sdk import EngineConcept, RedirectionEngine, Redirector, RedirectorConfig, load_bundle
from saferedir_sdk.policy import EffectiveRule, StepWindow
from saferedir_sdk.training import record_trajectories


def rule(concept="red", **kw) -> EffectiveRule:
    base = dict(concept=concept, category="custom", action="redirect", threshold=0.5, strength=1.3, replace_steps=1,
                sticky=True, apply_to_uncond=False, window=StepWindow())
    base.update(kw)
    return EffectiveRule(**base)


@pytest.fixture(scope="module")
def recorded(bundles):
    from saferedir_adapters.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(0)
    forget = record_trajectories(pipe, [f for f, _ in RED_PAIRS], seeds=[3], num_inference_steps=STEPS)
    retain = record_trajectories(pipe, [r for _, r in RED_PAIRS], seeds=[3], num_inference_steps=STEPS)
    star = record_trajectories(pipe, [f for f, _ in STAR_PAIRS], seeds=[3], num_inference_steps=STEPS)
    return forget, retain, load_bundle(bundles["red"]), load_bundle(bundles["star"]), star


def test_step_makes_no_host_read(recorded):
    """On the meta device a tensor has no data: any .item(), bool(tensor) or .tolist() inside a step
    would raise. The whole schedule runs there, so the loop never syncs with the host."""
    _, _, red, star, _ = recorded
    concepts = [EngineConcept(rule("red"), Redirector(red.config).to("meta")),
                EngineConcept(rule("star", action="monitor", sticky=False), Redirector(star.config).to("meta"))]
    engine = RedirectionEngine(concepts)
    cond = torch.empty(3, 77, 32, device="meta")
    state = engine.init_state(cond)
    for step in range(6):
        new_cond, new_uncond, state = engine.step(torch.empty(3, 4, 32, 32, device="meta"),
                                                  torch.tensor(999 - step, device="meta"), cond, state,
                                                  uncond=torch.empty(3, 77, 32, device="meta"))
        assert new_cond.device.type == "meta" and new_cond.shape == cond.shape
    assert state.step == 6 and state.checks == [3, 3]


@settings(max_examples=25, deadline=None)
@given(pattern=st.lists(st.booleans(), min_size=1, max_size=6), step_pick=st.integers(0, STEPS - 1))
def test_only_flagged_samples_move_in_any_batch(recorded, pattern, step_pick):
    forget, retain, red, _, _ = recorded
    n = len(RED_PAIRS)
    rows = [step_pick * n + (i % n) for i in range(len(pattern))]  # same step for the whole batch
    pick = lambda t, i, flagged: (forget if flagged else retain).__getattribute__(t)[i]  # noqa: E731
    latents = torch.stack([pick("latents", r, f) for r, f in zip(rows, pattern)])
    embeds = torch.stack([pick("embeds", r, f) for r, f in zip(rows, pattern)])
    t = forget.timesteps[rows[0]]
    engine = RedirectionEngine([EngineConcept(rule(), red.redirector)])
    state = engine.init_state(embeds)
    state.step = 0  # a check step
    out, _, state = engine.step(latents, t, embeds, state)
    moved = [not torch.equal(out[i], embeds[i]) for i in range(len(pattern))]
    assert moved == pattern


def test_concept_order_does_not_change_the_result(recorded):
    forget, _, red, star, star_forget = recorded
    lat = torch.cat([forget.latents[:2], star_forget.latents[:2]])
    emb = torch.cat([forget.embeds[:2], star_forget.embeds[:2]])
    t = forget.timesteps[0]
    low = dict(threshold=1e-6)  # both concepts fire on every sample
    a = RedirectionEngine([EngineConcept(rule("red", **low), red.redirector), EngineConcept(rule("star", **low), star.redirector)])
    b = RedirectionEngine([EngineConcept(rule("star", **low), star.redirector), EngineConcept(rule("red", **low), red.redirector)])
    out_a, _, _ = a.step(lat, t, emb, a.init_state(emb))
    out_b, _, _ = b.step(lat, t, emb, b.init_state(emb))
    assert torch.allclose(out_a, out_b, atol=1e-6)
    only_red = RedirectionEngine([EngineConcept(rule("red", **low), red.redirector)])
    out_r, _, _ = only_red.step(lat, t, emb, only_red.init_state(emb))
    assert not torch.allclose(out_a, out_r), "the second concept's delta is added, not ignored"


def test_non_sticky_rule_can_release_a_sample(recorded):
    forget, retain, red, _, _ = recorded
    engine = RedirectionEngine([EngineConcept(rule(sticky=False, replace_steps=0), red.redirector)])
    state = engine.init_state(forget.embeds[:1])
    out1, _, state = engine.step(forget.latents[:1], forget.timesteps[0], forget.embeds[:1], state)
    out2, _, state = engine.step(retain.latents[:1], retain.timesteps[0], retain.embeds[:1], state)
    assert not torch.equal(out1, forget.embeds[:1]) and torch.equal(out2, retain.embeds[:1])
    decision = engine.decisions(state)[0][0]
    assert decision.triggered and decision.first_step == 0 and decision.checks == 2


def test_shape_errors_name_the_tensor():
    from saferedir_sdk import TensorShapeError

    red = Redirector(RedirectorConfig(32, 77, 4, hidden_dim=64, rank=8, latent_pool=8))
    engine = RedirectionEngine([EngineConcept(rule(), red)])
    state = engine.init_state(torch.zeros(2, 77, 32))
    with pytest.raises(TensorShapeError, match="encoder_hidden_states"):
        engine.step(torch.zeros(2, 4, 8, 8), torch.tensor(5), torch.zeros(2, 77, 48), state)
    with pytest.raises(TensorShapeError, match="latents"):
        red(torch.zeros(2, 3, 8, 8), torch.tensor(5), torch.zeros(2, 77, 32))


def test_redirector_sizes_come_from_the_config():
    for d, t, c in [(32, 77, 4), (768, 77, 4), (2048, 77, 4), (384, 16, 12)]:
        red = Redirector(RedirectorConfig(d, t, c, hidden_dim=64, rank=8, latent_pool=8))
        out = red(torch.zeros(2, c, 16, 16), torch.tensor([1, 2]), torch.zeros(2, t, d))
        assert out.direction.shape == (2, t, d) and out.mask.shape == (2, t) and out.alpha.shape == (2,)
