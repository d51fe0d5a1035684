"""The engine: per-sample decisions, no host reads inside a step, deterministic combination."""

from __future__ import annotations

import pytest
import torch
from helpers import RED_PAIRS, STAR_PAIRS, STEPS
from hypothesis import given, settings
from hypothesis import strategies as st

from saferedir_sdk import (
    Conditioning,
    EngineConcept,
    RedirectionEngine,
    Redirector,
    RedirectorConfig,
    TensorShapeError,
    TokenStream,
    load_bundle,
)
from saferedir_sdk.capacity import Capacity
from saferedir_sdk.policy import ConceptRule, StepWindow
from saferedir_sdk.training import Trajectories, record_trajectories

SMALL = Capacity(hidden_dim=64, rank=8, num_heads=4, latent_pool=8, token_layers=1)


def rule(concept="red", **kw) -> ConceptRule:
    base = dict(
        concept=concept,
        category="custom",
        redirector={"path": "x.safetensors"},
        action="redirect",
        threshold=0.5,
        strength=1.3,
        replace_steps=1,
        sticky=True,
        apply_to_uncond=False,
        window=StepWindow(),
    )
    base.update(kw)
    return ConceptRule(**base)


def cond(*tokens: torch.Tensor, pooled: torch.Tensor | None = None) -> Conditioning:
    return Conditioning(tuple(tokens), pooled)


@pytest.fixture(scope="module")
def recorded(bundles):
    from saferedir_adapters.sd import StableDiffusionAdapter
    from saferedir_adapters.tiny import tiny_sd_pipeline

    adapter = StableDiffusionAdapter(tiny_sd_pipeline(0))
    kw = {"seeds": [3], "num_inference_steps": STEPS}
    forget = record_trajectories(adapter, [f for f, _ in RED_PAIRS], **kw)
    retain = record_trajectories(adapter, [r for _, r in RED_PAIRS], **kw)
    star = record_trajectories(adapter, [f for f, _ in STAR_PAIRS], **kw)
    return forget, retain, load_bundle(bundles["red"]), load_bundle(bundles["star"]), star


@pytest.mark.parametrize("gates, shifted", [("heads", False), ("yield", False), ("heads", True)])
def test_step_makes_no_host_read(recorded, gates, shifted):
    """On the meta device a tensor has no data: any .item(), bool(tensor) or .tolist() inside a step
    would raise. The whole schedule runs there, so the loop never syncs with the host."""
    _, _, red, star, _ = recorded
    shift = {"scale": 0.25, "unsafe": ["a red square"], "safe": ["a blue square"]} if shifted else None
    direction = cond(torch.empty(red.config.streams[0].dim, device="meta")) if shifted else None
    concepts = [
        EngineConcept(rule("red", gates=gates, shift=shift), Redirector(red.config).to("meta"), direction),
        EngineConcept(rule("star", action="monitor", sticky=False), Redirector(star.config).to("meta")),
    ]
    engine = RedirectionEngine(concepts)
    c = cond(torch.empty(3, 77, 32, device="meta"))
    state = engine.init_state(c)
    for step in range(6):
        new_cond, new_uncond, state = engine.step(
            torch.empty(3, 4, 32, 32, device="meta"),
            torch.tensor(1.0 - step / 10, device="meta"),
            c,
            state,
            uncond=cond(torch.empty(3, 77, 32, device="meta")),
        )
        assert new_cond.device.type == "meta" and new_cond.tokens[0].shape == c.tokens[0].shape
        assert new_uncond is not None and new_uncond.device.type == "meta"
    engine.uncond_only(cond(torch.empty(3, 77, 32, device="meta")), state)
    assert state.step == 6 and state.checks == [3, 3]


@settings(max_examples=25, deadline=None)
@given(pattern=st.lists(st.booleans(), min_size=1, max_size=6), step_pick=st.integers(0, STEPS - 1))
def test_only_flagged_samples_move_in_any_batch(recorded, pattern, step_pick):
    forget, retain, red, _, _ = recorded
    n = len(RED_PAIRS)
    rows = [step_pick * n + (i % n) for i in range(len(pattern))]  # same step for the whole batch
    latents = torch.stack([(forget if f else retain).latents[r] for r, f in zip(rows, pattern)])
    embeds = torch.stack([(forget if f else retain).cond.tokens[0][r] for r, f in zip(rows, pattern)])
    t = forget.timesteps[rows[0]]
    engine = RedirectionEngine([EngineConcept(rule(), red.redirector)])
    state = engine.init_state(cond(embeds))
    out, _, state = engine.step(latents, t, cond(embeds), state)  # step 0: a check step
    moved = [not torch.equal(out.tokens[0][i], embeds[i]) for i in range(len(pattern))]
    assert moved == pattern


def test_concept_order_does_not_change_the_result(recorded):
    forget, _, red, star, star_forget = recorded
    lat = torch.cat([forget.latents[:2], star_forget.latents[:2]])
    emb = cond(torch.cat([forget.cond.tokens[0][:2], star_forget.cond.tokens[0][:2]]))
    t = forget.timesteps[0]
    low = dict(threshold=1e-6)  # both concepts fire on every sample
    a = RedirectionEngine(
        [
            EngineConcept(rule("red", **low), red.redirector),
            EngineConcept(rule("star", **low), star.redirector),
        ]
    )
    b = RedirectionEngine(
        [
            EngineConcept(rule("star", **low), star.redirector),
            EngineConcept(rule("red", **low), red.redirector),
        ]
    )
    out_a, _, _ = a.step(lat, t, emb, a.init_state(emb))
    out_b, _, _ = b.step(lat, t, emb, b.init_state(emb))
    assert torch.allclose(out_a.tokens[0], out_b.tokens[0], atol=1e-6)
    only_red = RedirectionEngine([EngineConcept(rule("red", **low), red.redirector)])
    out_r, _, _ = only_red.step(lat, t, emb, only_red.init_state(emb))
    assert not torch.allclose(out_a.tokens[0], out_r.tokens[0]), (
        "the second concept's delta is added, not ignored"
    )


def test_non_sticky_rule_can_release_a_sample(recorded):
    forget, retain, red, _, _ = recorded
    engine = RedirectionEngine([EngineConcept(rule(sticky=False, replace_steps=0), red.redirector)])
    f, r = forget.select(torch.tensor([0])), retain.select(torch.tensor([0]))
    state = engine.init_state(f.cond)
    out1, _, state = engine.step(f.latents, f.timesteps, f.cond, state)
    out2, _, state = engine.step(r.latents, r.timesteps, r.cond, state)
    assert not torch.equal(out1.tokens[0], f.cond.tokens[0]) and torch.equal(out2.tokens[0], r.cond.tokens[0])
    decision = engine.decisions(state)[0][0]
    assert not decision.triggered and decision.first_step == 0 and decision.checks == 2, (
        "released, first hit kept"
    )


def test_uncond_only_call_moves_the_negative_half_of_the_step_it_belongs_to(recorded):
    """A backbone that runs the CFG halves as separate calls (FLUX's true CFG): the unconditional
    call after a step gets that step's delta when the rule says apply_to_uncond, and nothing else."""
    forget, _, red, _, _ = recorded
    f = forget.select(torch.tensor([0, 1]))
    negative = cond(torch.randn(2, 77, 32))
    for apply in (True, False):
        engine = RedirectionEngine(
            [EngineConcept(rule(threshold=1e-6, apply_to_uncond=apply), red.redirector)]
        )
        state = engine.init_state(f.cond)
        assert torch.equal(
            engine.uncond_only(negative, state).tokens[0], negative.tokens[0]
        )  # before any step
        new_cond, batched_uncond, state = engine.step(f.latents, f.timesteps, f.cond, state, uncond=negative)
        alone = engine.uncond_only(negative, state)
        assert torch.equal(alone.tokens[0], batched_uncond.tokens[0])
        assert torch.equal(alone.tokens[0], negative.tokens[0]) is (not apply)


def test_shape_errors_name_the_tensor():
    stream = TokenStream("text_encoder", 77, 32)
    red = Redirector(RedirectorConfig((stream,), 4, capacity=SMALL))
    engine = RedirectionEngine([EngineConcept(rule(), red)])
    state = engine.init_state(cond(torch.zeros(2, 77, 32)))
    with pytest.raises(TensorShapeError, match="conditional token streams"):
        engine.step(torch.zeros(2, 4, 8, 8), torch.tensor(0.5), cond(torch.zeros(2, 77, 48)), state)
    with pytest.raises(TensorShapeError, match="latents"):
        red(torch.zeros(2, 3, 8, 8), torch.tensor(0.5), cond(torch.zeros(2, 77, 32)))
    with pytest.raises(TensorShapeError, match="conditioning 'text_encoder'"):
        red(torch.zeros(2, 4, 8, 8), torch.tensor(0.5), cond(torch.zeros(2, 76, 32)))


@pytest.mark.parametrize(
    "streams, pooled, channels",
    [
        ([(77, 32)], 0, 4),  # tiny SD 1.x
        ([(77, 768)], 0, 4),  # SD 1.x
        ([(77, 1024)], 0, 4),  # SD 2.x
        ([(77, 768), (77, 1280)], 1280, 4),  # SDXL: two encoders side by side, pooled text_embeds
        ([(77, 4096), (256, 4096)], 2048, 16),  # SD3: CLIP then T5, pooled projections
        ([(24, 384)], 0, 12),  # the Shapes backbone
    ],
)
def test_redirector_sizes_come_from_the_config(streams, pooled, channels):
    config = RedirectorConfig(
        tuple(TokenStream(f"s{i}", t, d) for i, (t, d) in enumerate(streams)),
        channels,
        pooled_dim=pooled,
        capacity=SMALL,
    )
    red = Redirector(config)
    c = cond(*(torch.randn(2, t, d) for t, d in streams), pooled=torch.randn(2, pooled) if pooled else None)
    out = red(torch.zeros(2, channels, 16, 16), torch.tensor([0.9, 0.1]), c)
    assert [tuple(d.shape) for d in out.directions] == [(2, t, d) for t, d in streams]
    assert [tuple(m.shape) for m in out.masks] == [(2, t) for t, _ in streams] and out.alpha.shape == (2,)
    assert (out.pooled_direction is None) == (pooled == 0)
    if pooled:
        assert out.pooled_direction.shape == (2, pooled) and out.pooled_mask.shape == (2,)
    # the engine moves every stream (and the pooled embedding) of a triggered sample
    engine = RedirectionEngine([EngineConcept(rule(threshold=1e-6, strength=1.0), red)])
    moved, _, _ = engine.step(torch.zeros(2, channels, 16, 16), torch.tensor(0.5), c, engine.init_state(c))
    assert all(not torch.equal(a, b) for a, b in zip(moved.tokens, c.tokens))
    assert pooled == 0 or not torch.equal(moved.pooled, c.pooled)
    if pooled:  # move_pooled: false moves the same tokens and leaves the pooled embedding exactly
        keep = RedirectionEngine([EngineConcept(rule(threshold=1e-6, strength=1.0, move_pooled=False), red)])
        kept, _, _ = keep.step(torch.zeros(2, channels, 16, 16), torch.tensor(0.5), c, keep.init_state(c))
        assert torch.equal(kept.pooled, c.pooled)
        assert all(torch.equal(a, b) for a, b in zip(kept.tokens, moved.tokens))


def test_a_trigger_the_latent_contradicts_is_released_before_it_sticks(recorded):
    """confirm_checks=2: a first positive check redirects at once but is revised by a negative one;
    two positives in a row stick (a later negative check no longer releases)."""
    forget, retain, red, _, _ = recorded
    f, r = forget.select(torch.tensor([0])), retain.select(torch.tensor([0]))
    engine = RedirectionEngine([EngineConcept(rule(replace_steps=0, confirm_checks=2), red.redirector)])
    state = engine.init_state(f.cond)
    moved, _, state = engine.step(f.latents, f.timesteps, f.cond, state)
    assert not torch.equal(moved.tokens[0], f.cond.tokens[0]), "acts from the first positive check"
    kept, _, state = engine.step(
        r.latents, r.timesteps, r.cond, state
    )  # the next check says: not the concept
    assert torch.equal(kept.tokens[0], r.cond.tokens[0]) and not engine.decisions(state)[0][0].triggered
    for _ in range(2):
        _, _, state = engine.step(f.latents, f.timesteps, f.cond, state)
    _, _, state = engine.step(r.latents, r.timesteps, r.cond, state)
    assert engine.decisions(state)[0][0].triggered, "confirmed twice: sticks"


def test_escalation_raises_the_strength_while_the_concept_still_shows(recorded):
    forget, _, red, _, _ = recorded
    f = forget.select(torch.tensor([0]))
    always = dict(threshold=1e-6, replace_steps=0, strength=1.0)
    engine = RedirectionEngine(
        [EngineConcept(rule(escalate=1.5, escalate_max=2.0, **always), red.redirector)]
    )
    state = engine.init_state(f.cond)
    sizes = []
    for _ in range(4):
        moved, _, state = engine.step(f.latents, f.timesteps, f.cond, state)
        sizes.append(float((moved.tokens[0] - f.cond.tokens[0]).norm()))
    assert sizes[1] == pytest.approx(1.5 * sizes[0], rel=1e-4) and sizes[2] == pytest.approx(
        2.0 * sizes[0], rel=1e-4
    )
    assert sizes[3] == pytest.approx(sizes[2], rel=1e-6), "capped at escalate_max"
    assert engine.decisions(state)[0][0].escalation == 2.0
    plain = RedirectionEngine([EngineConcept(rule(**always), red.redirector)])
    state = plain.init_state(f.cond)
    for _ in range(3):
        moved, _, state = plain.step(f.latents, f.timesteps, f.cond, state)
    assert float((moved.tokens[0] - f.cond.tokens[0]).norm()) == pytest.approx(sizes[0], rel=1e-6), (
        "off by default"
    )


def test_checks_above_decide_at_t_record_the_score_and_never_trigger(recorded):
    """``decide_at_t`` is a noise level: the same latent checked at t 0.9 and 0.6 records, at t 0.5
    (the bound itself) decides; ``deciding_checks`` counts the checks that could trigger."""
    forget, _, red, _, _ = recorded
    f = forget.select(torch.tensor([0]))
    engine = RedirectionEngine([EngineConcept(rule(replace_steps=0, decide_at_t=0.5), red.redirector)])
    state = engine.init_state(f.cond)
    for t in (0.9, 0.6):
        moved, _, state = engine.step(f.latents, torch.tensor([t]), f.cond, state)
        assert torch.equal(moved.tokens[0], f.cond.tokens[0]), f"no decision at t {t} > 0.5"
    ((d,),) = engine.decisions(state)
    assert not d.triggered and d.first_step is None and d.max_score > 0.5 and d.checks == 2
    assert d.deciding_checks == 0 and d.max_deciding_score is None, "no check could trigger yet"
    moved, _, state = engine.step(f.latents, torch.tensor(0.5), f.cond, state)
    ((d,),) = engine.decisions(state)
    assert not torch.equal(moved.tokens[0], f.cond.tokens[0]) and d.first_step == 2
    assert d.deciding_checks == 1 and d.checks == 3
    with torch.no_grad():
        at_bound = float(torch.sigmoid(red.redirector(f.latents, torch.tensor(0.5), f.cond).logit))
    # the audit's max_deciding_score is the score of the one check that could trigger, not the
    # highest of all three (checks above decide_at_t are in max_score only)
    assert d.max_deciding_score == pytest.approx(at_bound, abs=1e-5)
    assert d.max_score >= d.max_deciding_score


def test_a_rewind_rule_only_decides_in_a_rehearsal_and_its_flags_start_the_next_run_stuck(recorded):
    forget, retain, red, _, _ = recorded
    both = Trajectories.concat([forget.select(torch.tensor([0])), retain.select(torch.tensor([0]))])
    engine = RedirectionEngine([EngineConcept(rule(replace_steps=0, rewind=True), red.redirector)])
    assert engine.rewinds
    state = engine.init_state(both.cond, rehearsal=True)
    moved, _, state = engine.step(both.latents, both.timesteps, both.cond, state)
    assert torch.equal(moved.tokens[0], both.cond.tokens[0]), "a rehearsal moves nothing"
    assert engine.flagged(state).tolist() == [[True], [False]] and not bool(engine.rehearsal_settled(state))
    # the second run: the flagged sample is redirected though no check of it may trigger any more
    never = RedirectionEngine(
        [EngineConcept(rule(replace_steps=0, rewind=True, decide_at_t=1e-6), red.redirector)]
    )
    again = never.init_state(both.cond, engine.flagged(state))
    moved, _, again = never.step(both.latents, both.timesteps, both.cond, again)
    assert not torch.equal(moved.tokens[0][0], both.cond.tokens[0][0])
    assert torch.equal(moved.tokens[0][1], both.cond.tokens[0][1])
    with pytest.raises(TensorShapeError, match="flagged samples"):
        engine.init_state(both.cond, torch.zeros(3, 1, dtype=torch.bool))


def test_a_rewind_rule_moves_only_what_it_confirmed_in_the_second_run_too(recorded):
    """In the second run the samples the first run did not flag replay its trajectory: a single hit
    there (confirm_checks 2) moves nothing and records no trigger, where a plain rule acts on it, so a
    sample's image does not depend on whether a batch mate was flagged."""
    forget, retain, red, _, _ = recorded
    f, r = forget.select(torch.tensor([0])), retain.select(torch.tensor([0]))
    rewinding = RedirectionEngine(
        [EngineConcept(rule(replace_steps=0, rewind=True, confirm_checks=2), red.redirector)]
    )
    plain = RedirectionEngine([EngineConcept(rule(replace_steps=0, confirm_checks=2), red.redirector)])
    states = {e: e.init_state(f.cond) for e in (rewinding, plain)}  # not a rehearsal: a second run
    for e in states:
        moved, _, states[e] = e.step(f.latents, f.timesteps, f.cond, states[e])  # a hit
        assert torch.equal(moved.tokens[0], f.cond.tokens[0]) != (e is plain)
        moved, _, states[e] = e.step(r.latents, r.timesteps, r.cond, states[e])  # no hit: released
    ((d,),) = rewinding.decisions(states[rewinding])
    assert d.max_score > 0.5 and not d.triggered and not d.applied and d.first_step is None
    ((d,),) = plain.decisions(states[plain])
    assert d.applied and d.first_step == 0
    # two hits in a row: confirmed, moved from the confirming check on
    state = rewinding.init_state(f.cond)
    for step in range(2):
        moved, _, state = rewinding.step(f.latents, f.timesteps, f.cond, state)
        assert torch.equal(moved.tokens[0], f.cond.tokens[0]) == (step == 0)
    ((d,),) = rewinding.decisions(state)
    assert d.triggered and d.applied and d.first_step == 1


def test_a_redirection_the_latent_still_contradicts_is_unresolved(recorded, latent_red):
    """``unresolved``: the last ``confirm_checks`` deciding checks all saw the concept while the rule
    was already moving the sample. A check that no longer sees it clears that; a check above
    ``decide_at_t`` neither counts nor clears; a rehearsal (nothing moved) and a monitor rule never
    count; a classifier that reads the prompt too cannot tell (None)."""
    from saferedir_adapters.sd import StableDiffusionAdapter
    from saferedir_adapters.tiny import tiny_sd_pipeline

    prompt_reading = recorded[2]
    red = load_bundle(latent_red["red"])
    # the first pair at one of the bundle's training seeds (a tiny random-weights backbone's
    # latent-only classifier knows its training noises), at its last step: the image formed
    adapter = StableDiffusionAdapter(tiny_sd_pipeline(0))
    f, r = (
        record_trajectories(adapter, [p], seeds=[0], num_inference_steps=STEPS, guidance_scale=7.5)
        for p in RED_PAIRS[0]
    )
    f, r = (x.select(torch.tensor([STEPS - 1])) for x in (f, r))
    t = torch.tensor([0.5])  # every check below at this noise level unless it says otherwise
    with torch.no_grad():
        scores = [float(red.redirector(x.latents, t, x.cond).logit.sigmoid()) for x in (f, r)]
    assert scores[0] > scores[1], f"the latent-only classifier tells these two apart: {scores}"
    between = dict(replace_steps=0, threshold=sum(scores) / 2)  # f's latent hits, r's does not
    engine = RedirectionEngine(
        [EngineConcept(rule(confirm_checks=2, decide_at_t=0.5, **between), red.redirector)]
    )
    state = engine.init_state(f.cond)
    seen = []
    for x, at in ((f, 0.5), (f, 0.5), (f, 0.9), (f, 0.5), (r, 0.5), (f, 0.5), (f, 0.5)):
        _, _, state = engine.step(x.latents, torch.tensor([at]), x.cond, state)
        seen.append(engine.decisions(state)[0][0].unresolved)
    # hit (not moving yet), hit while moving (1), undecided, hit (2: unresolved), clear, 1, 2
    assert seen == [False, False, False, True, False, False, True]
    assert engine.decisions(state)[0][0].triggered, "a sticky trigger stays: only the count clears"

    rewinding = RedirectionEngine(
        [EngineConcept(rule(rewind=True, confirm_checks=1, **between), red.redirector)]
    )
    rehearsal = rewinding.init_state(f.cond, rehearsal=True)
    second = rewinding.init_state(f.cond, torch.ones(1, 1, dtype=torch.bool))
    for _ in range(3):
        _, _, rehearsal = rewinding.step(f.latents, t, f.cond, rehearsal)
        _, _, second = rewinding.step(f.latents, t, f.cond, second)
    assert not rewinding.decisions(rehearsal)[0][0].unresolved, "a rehearsal moves nothing"
    assert rewinding.decisions(second)[0][0].unresolved, "redirected from the start, still seen"

    watching = RedirectionEngine([EngineConcept(rule(action="monitor", **between), red.redirector)])
    state = watching.init_state(f.cond)
    for _ in range(3):
        _, _, state = watching.step(f.latents, t, f.cond, state)
    ((d,),) = watching.decisions(state)
    assert d.triggered and d.unresolved is None

    reading = RedirectionEngine([EngineConcept(rule(**between), prompt_reading.redirector)])
    state = reading.init_state(f.cond)
    for _ in range(3):
        _, _, state = reading.step(f.latents, t, f.cond, state)
    ((d,),) = reading.decisions(state)
    assert d.triggered and d.unresolved is None


def test_a_flagged_sample_moves_only_at_or_below_redirect_at_t_per_sample(recorded):
    forget, _, red, _, _ = recorded
    two = forget.select(torch.tensor([0, 1]))
    engine = RedirectionEngine(
        [EngineConcept(rule(replace_steps=0, rewind=True, redirect_at_t=0.6), red.redirector)]
    )
    flagged = torch.ones(2, 1, dtype=torch.bool)
    state = engine.init_state(two.cond, flagged)
    moved, _, state = engine.step(two.latents, torch.tensor(0.9), two.cond, state)
    assert torch.equal(moved.tokens[0], two.cond.tokens[0]) and not state.applied.any()
    # per-sample timesteps: the first above the level, the second at it
    state = engine.init_state(two.cond, flagged)
    moved, _, state = engine.step(two.latents, torch.tensor([0.9, 0.6]), two.cond, state)
    assert torch.equal(moved.tokens[0][0], two.cond.tokens[0][0])
    assert not torch.equal(moved.tokens[0][1], two.cond.tokens[0][1])
    assert state.applied.tolist() == [[False], [True]]


def test_opened_lifts_only_the_gates_that_shut_a_move_out():
    from saferedir_sdk.redirector import RedirectorOutput, open_gates, shut_gates

    masks = torch.tensor([[[0.1, 0.2, 0.4], [0.1, 0.9, 0.0]], [[0.3, 0.3, 0.3], [0.0, 0.0, 0.0]]])
    out = RedirectorOutput(
        logit=torch.zeros(2, 2),
        directions=(torch.ones(2, 2, 3, 4),),
        masks=(masks,),
        alpha=torch.tensor([[0.2, 0.8], [0.0, 0.49]]),
        pooled_direction=torch.ones(2, 2, 4),
        pooled_mask=torch.tensor([[0.6, 0.1], [0.1, 0.1]]),
    )
    # (0, 0): alpha and mask shut; (0, 1): only the pooled gate; (1, *): alpha and mask
    assert shut_gates(out).tolist() == [[True, True], [True, True]]
    assert shut_gates(out._replace(pooled_mask=None)).tolist() == [[True, False], [True, True]]
    where = torch.tensor([[True, True], [False, False]])  # K = 2 stacked: only the first opens
    y = open_gates(out, where)
    assert torch.allclose(y.alpha, torch.tensor([[1.0, 0.8], [0.0, 0.49]]))
    assert torch.allclose(y.masks[0][0], torch.tensor([[1.0, 1.0, 1.0], [0.1, 0.9, 0.0]]))
    assert torch.equal(y.masks[0][1], masks[1]), "where it does not open, the gates are kept"
    assert torch.allclose(y.pooled_mask, torch.tensor([[0.6, 1.0], [0.1, 0.1]]))
    assert torch.equal(open_gates(out, torch.zeros(2, 2, dtype=torch.bool)).alpha, out.alpha)


def test_gates_yield_opens_the_gates_the_heads_shut_at_the_first_move_for_the_call(recorded):
    """A scale head that says 0 vetoes the move under ``gates: heads``; under ``yield`` the gates are
    read at the first check that moves the sample: shut there, the flagged sample moves by
    s * m * normalize(D) * |E| (alpha 1) from then on, and its record says ``gates_opened``; a second
    rule in the same group that keeps ``heads`` still gets nothing. Gates read open keep the heads'
    own values later, shut or not; a rehearsal reads nothing; the second run reads at its first check."""
    import copy

    forget, _, red, _, _ = recorded
    f = forget.select(torch.tensor([0, 1]))
    shut = copy.deepcopy(red.redirector)
    with torch.no_grad():
        shut.scale_head[-1].bias.fill_(-40.0)  # alpha ~ 4e-18
    always = dict(threshold=1e-6, replace_steps=0, strength=1.0)

    def moved(*gates: str, read_open: bool = False) -> list[float]:
        concepts = [EngineConcept(rule(f"c{i}", gates=g, **always), shut) for i, g in enumerate(gates)]
        engine = RedirectionEngine(concepts)
        state = engine.init_state(f.cond)
        state.gates_read[:] = read_open
        out, _, state = engine.step(f.latents, f.timesteps, f.cond, state)
        audit = [[d.gates_opened for d in row] for row in engine.decisions(state)]
        assert audit == [[g == "yield" and not read_open for g in gates]] * 2, audit
        return [float((out.tokens[0][i] - f.cond.tokens[0][i]).norm()) for i in range(2)]

    assert max(moved("heads")) < 1e-6
    lifted = moved("yield")
    assert min(lifted) > 0.1
    assert moved("yield", "heads") == pytest.approx(lifted, rel=1e-5)
    assert max(moved("yield", read_open=True)) < 1e-6, "read open at the first move: the heads' gates"
    assert rule().gates == "heads", "heads by default"
    with pytest.raises(ValueError, match="gates"):
        rule(gates="open")

    engine = RedirectionEngine([EngineConcept(rule(gates="yield", rewind=True, **always), shut)])
    state = engine.init_state(f.cond, rehearsal=True)
    _, _, state = engine.step(f.latents, f.timesteps, f.cond, state)
    assert not state.gates_read.any(), "a rehearsal moves nothing, so it reads no gates"
    state = engine.init_state(f.cond, engine.flagged(state))
    out, _, state = engine.step(f.latents, f.timesteps, f.cond, state)
    assert state.gates_read.all() and state.opening.all()
    assert float((out.tokens[0] - f.cond.tokens[0]).norm()) > 0.1


def test_a_shift_direction_is_the_unit_difference_of_the_real_tokens_means():
    from saferedir_sdk.redirector import shift_direction

    g = torch.Generator().manual_seed(0)
    unsafe = cond(
        torch.randn(3, 5, 8, generator=g),
        torch.randn(3, 4, 6, generator=g),
        pooled=torch.randn(3, 7, generator=g),
    )
    safe = cond(
        torch.randn(2, 5, 8, generator=g),
        torch.randn(2, 4, 6, generator=g),
        pooled=torch.randn(2, 7, generator=g),
    )
    real_u = torch.tensor(
        [[1, 1, 0, 0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 0, 1, 1, 1, 1]]
    ).bool()
    real_s = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 1, 1, 0, 0]]).bool()

    def means(c: Conditioning, real: torch.Tensor, i: int, offset: int) -> torch.Tensor:
        e = c.tokens[i]
        rows = [e[n][real[n, offset : offset + e.shape[1]]].mean(0) for n in range(e.shape[0])]
        return torch.stack(rows).mean(0)

    d = shift_direction(unsafe, real_u, safe, real_s)
    for i, offset in ((0, 0), (1, 5)):
        want = means(safe, real_s, i, offset) - means(unsafe, real_u, i, offset)  # padding never counts
        assert torch.allclose(d.tokens[i], want / want.norm(), atol=1e-6)
    want = safe.pooled.mean(0) - unsafe.pooled.mean(0)
    assert torch.allclose(d.pooled, want / want.norm(), atol=1e-6)
    with pytest.raises(ValueError, match="token stream 0: the safe and unsafe prompts give no direction"):
        shift_direction(unsafe, real_u, unsafe, real_u)


def test_a_shift_moves_every_token_of_a_flagged_sample_along_its_direction_whatever_the_heads_say(recorded):
    """With the heads' scale forced to 0 (they move nothing), a rule with a ``shift`` still moves each
    token of a flagged sample by strength * scale * |E| along the shift's direction; a sample it does
    not flag stays; a rule without a shift in the same group gets nothing from it. The decision
    records how far the shift moved each sample (strength * scale), None where none moved it."""
    import copy

    forget, _, red, _, _ = recorded
    f = forget.select(torch.tensor([0, 1]))
    shut = copy.deepcopy(red.redirector)
    with torch.no_grad():
        shut.scale_head[-1].bias.fill_(-40.0)  # alpha ~ 4e-18
    dim = f.cond.tokens[0].shape[-1]
    d = torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(1)), dim=0)
    shift = {"scale": 0.25, "unsafe": ["a red square"], "safe": ["a blue square"]}

    def moved(threshold: float, *shifted: bool) -> torch.Tensor:
        concepts = [
            EngineConcept(
                rule(f"c{i}", threshold=threshold, replace_steps=0, strength=2.0, shift=shift if s else None),
                shut,
                cond(d) if s else None,
            )
            for i, s in enumerate(shifted)
        ]
        engine = RedirectionEngine(concepts)
        out, _, state = engine.step(f.latents, f.timesteps, f.cond, engine.init_state(f.cond))
        recorded_shifts[:] = [[d.shift for d in row] for row in engine.decisions(state)]
        return out.tokens[0] - f.cond.tokens[0]

    recorded_shifts: list[list[float | None]] = []

    e = f.cond.tokens[0]
    want = 2.0 * 0.25 * e.norm(dim=-1, keepdim=True) * d
    assert torch.allclose(moved(1e-6, True), want, atol=1e-4)
    assert torch.allclose(moved(1e-6, True, False), want, atol=1e-4), "the rule without a shift adds nothing"
    assert recorded_shifts == [[0.5, None], [0.5, None]]
    assert float(moved(1e-6, False).abs().max()) < 1e-6, "without a shift the shut heads move nothing"
    assert recorded_shifts == [[None], [None]]
    assert float(moved(1.0 - 1e-7, True).abs().max()) == 0.0, "an unflagged sample does not move"
    assert recorded_shifts == [[None], [None]]


def test_a_shift_and_its_direction_come_together_and_fit_the_redirector(recorded):
    from saferedir_sdk import TensorShapeError

    _, _, red, _, _ = recorded
    dim = red.config.streams[0].dim
    shift = {"scale": 0.25, "unsafe": ["a red square"], "safe": ["a blue square"]}
    with pytest.raises(ValueError, match="'red': a rule with a shift needs its direction"):
        EngineConcept(rule(shift=shift), red.redirector)
    with pytest.raises(ValueError, match="rule shift unset, direction given"):
        EngineConcept(rule(), red.redirector, cond(torch.ones(dim)))
    with pytest.raises(
        TensorShapeError, match=rf"shift direction of 'red', token stream 0: expected shape \({dim},\)"
    ):
        EngineConcept(rule(shift=shift), red.redirector, cond(torch.ones(dim + 1)))
    with pytest.raises(ValueError, match="has a pooled part, the redirector reads none"):
        EngineConcept(rule(shift=shift), red.redirector, cond(torch.ones(dim), pooled=torch.ones(3)))
    for bad, where in (
        ({"scale": 0.0, "unsafe": ["a"], "safe": ["b"]}, "scale"),
        ({"scale": 1.5, "unsafe": ["a"], "safe": ["b"]}, "scale"),
        ({"scale": 0.2, "unsafe": [], "safe": ["b"]}, "unsafe"),
        ({"scale": 0.2, "unsafe": ["a"], "safe": ["  "]}, "safe"),
        ({"scale": 0.2, "unsafe": ["a"]}, "safe"),
    ):
        with pytest.raises(ValueError, match=f"shift.{where}"):
            rule(shift=bad)
