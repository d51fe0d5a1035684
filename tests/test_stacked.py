"""Concepts run as one stacked computation (issue #15): each bundle's results stay those of running
it alone (within float32 rounding), the engine's decisions and deltas are those of the
per-concept loop it replaced, and the work per step does not grow with the number of concepts."""

from __future__ import annotations

import pytest
import torch
from test_engine import rule

from saferedir_sdk import (
    Conditioning,
    EngineConcept,
    RedirectionEngine,
    Redirector,
    RedirectorConfig,
    TokenStream,
)
from saferedir_sdk.capacity import Capacity
from saferedir_sdk.redirector import redirection
from saferedir_sdk.stacked import StackedRedirectors, kernel_ops

SMALL = Capacity(hidden_dim=64, rank=8, num_heads=4, latent_pool=8)
VARIANTS = [
    SMALL,
    Capacity(hidden_dim=64, rank=8, num_heads=4, latent_pool=8, token_layers=0),
    Capacity(hidden_dim=64, rank=8, num_heads=4, latent_pool=8, latent_layers=3, latent_readout="mean+max"),
    Capacity(hidden_dim=64, rank=16, num_heads=2, latent_pool=8, token_layers=2),
    Capacity(hidden_dim=64, rank=8, num_heads=4, latent_pool=8, classifier_reads="latent"),
    Capacity(
        hidden_dim=64,
        rank=8,
        num_heads=4,
        latent_pool=8,
        latent_layers=3,
        latent_readout="mean+max",
        classifier_reads="latent",
        classifier_encoder="own",
    ),  # fmt: skip
    Capacity(
        hidden_dim=64,
        rank=8,
        num_heads=4,
        latent_pool=8,
        classifier_reads="latent",
        classifier_encoder="own",
        classifier_members=3,
    ),  # fmt: skip  (an ensemble of three classifiers: saferedir bundle ensemble)
]
LAYOUTS = {"sd": ([(77, 32)], 0), "sdxl": ([(77, 32), (77, 48)], 40)}


def config(layout: str, capacity: Capacity = SMALL) -> RedirectorConfig:
    streams, pooled = LAYOUTS[layout]
    return RedirectorConfig(
        tuple(TokenStream(f"s{i}", t, d) for i, (t, d) in enumerate(streams)), 4, pooled, capacity
    )


def redirectors(cfg: RedirectorConfig, n: int, seed: int = 0) -> list[Redirector]:
    """``n`` redirectors with weights spread enough that scores and deltas differ per concept."""
    torch.manual_seed(seed)
    out = []
    for _ in range(n):
        r = Redirector(cfg).eval()
        with torch.no_grad():
            for p in r.parameters():
                p.normal_(0.0, 0.2)
        out.append(r)
    return out


def inputs(cfg: RedirectorConfig, b: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cond = Conditioning(
        tuple(torch.randn(b, s.seq_len, s.dim, generator=g) for s in cfg.streams),
        torch.randn(b, cfg.pooled_dim, generator=g) if cfg.pooled_dim else None,
    )
    return torch.randn(b, cfg.latent_channels, 32, 32, generator=g), torch.rand(b, generator=g), cond


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    "capacity",
    VARIANTS,
    ids=lambda c: (
        f"h{c.hidden_dim}-tl{c.token_layers}-{c.latent_readout}-{c.classifier_reads}-{c.classifier_encoder}"
        f"-m{c.classifier_members}"
    ),
)
def test_stacked_matches_each_redirector_alone(layout, capacity):
    cfg = config(layout, capacity)
    mods = redirectors(cfg, 3)
    latents, t, cond = inputs(cfg)
    stacked = StackedRedirectors(mods)(latents, t, cond)
    for k, mod in enumerate(mods):
        with torch.no_grad():
            alone = mod(latents, t, cond)
        pairs = [(stacked.logit[k], alone.logit), (stacked.alpha[k], alone.alpha)]
        pairs += [(a[k], b) for a, b in zip(stacked.directions, alone.directions)]
        pairs += [(a[k], b) for a, b in zip(stacked.masks, alone.masks)]
        if cfg.pooled_dim:
            pairs += [
                (stacked.pooled_direction[k], alone.pooled_direction),
                (stacked.pooled_mask[k], alone.pooled_mask),
            ]
        for a, b in pairs:
            assert a.shape == b.shape
            assert torch.allclose(a, b, atol=1e-5, rtol=0), float((a - b).abs().max())
    assert float(stacked.logit.std()) > 0.05, (
        "the concepts' scores differ: the check compares distinct outputs"
    )


def test_stacks_refuse_mixed_architectures():
    with pytest.raises(ValueError, match="share a config"):
        StackedRedirectors(redirectors(config("sd"), 1) + redirectors(config("sd", VARIANTS[1]), 1))


def reference_run(concepts, latents, timesteps, cond, steps):
    """The per-concept loop the stacked engine replaced: each redirector alone, rules applied one by
    one, deltas summed in policy order. Returns per step the redirected cond, and the final state."""
    k = len(concepts)
    b = cond.batch_size
    triggered = torch.zeros(b, k, dtype=torch.bool)
    hits = torch.zeros(b, k, dtype=torch.int64)
    stuck = torch.zeros(b, k, dtype=torch.bool)
    boost = torch.ones(b, k)
    first = torch.full((b, k), -1)
    deltas = [cond.map(torch.zeros_like) for _ in concepts]
    outs = []
    for step in range(steps):
        for j, c in enumerate(concepts):
            r = c.rule
            if not c.is_check_step(step):
                continue
            with torch.no_grad():
                out = c.redirector(latents[step], timesteps[step], cond)
            hit = torch.sigmoid(out.logit) >= r.threshold
            was_on = triggered[:, j].clone()
            if r.sticky:
                hits[:, j] = torch.where(hit, hits[:, j] + 1, torch.where(stuck[:, j], hits[:, j], 0))
                stuck[:, j] |= hits[:, j] >= r.confirm_checks
                triggered[:, j] = stuck[:, j] | hit
            else:
                triggered[:, j] = hit
            if r.escalate > 1.0:
                boost[:, j] = torch.where(
                    hit & was_on, (boost[:, j] * r.escalate).clamp(max=r.escalate_max), boost[:, j]
                )
            first[:, j] = torch.where(hit & (first[:, j] < 0), step, first[:, j])
            if r.action == "redirect":
                delta = redirection(cond, out, r.strength * boost[:, j] if r.escalate > 1.0 else r.strength)
                if not r.move_pooled and delta.pooled is not None:
                    delta = Conditioning(delta.tokens, torch.zeros_like(delta.pooled))
                deltas[j] = delta
        total = cond.map(torch.zeros_like)
        for j, c in enumerate(concepts):
            if c.rule.action == "redirect" and c.rule.window.contains(step):
                total = total.zip_with(deltas[j].masked(triggered[:, j]), torch.add)
        outs.append(cond.zip_with(total, torch.add))
    return outs, triggered, first, boost


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_engine_decides_and_moves_as_the_per_concept_loop(layout):
    """Six concepts in three groups (two architectures, two schedules), every rule setting varied:
    same triggers, first steps, escalation and redirected conditioning as the loop, every step."""
    cfg_a, cfg_b = config(layout), config(layout, VARIANTS[2])
    mods = redirectors(cfg_a, 4) + redirectors(cfg_b, 2, seed=5)
    steps, b = 6, 4
    g = torch.Generator().manual_seed(3)
    _, _, cond = inputs(cfg_a, b)
    latents = [torch.randn(b, 4, 32, 32, generator=g) for _ in range(steps)]
    timesteps = [torch.full((b,), 1 - s / steps) for s in range(steps)]
    with torch.no_grad():  # each concept's threshold at its median score: some checks hit, some not
        median = [
            float(
                torch.cat([torch.sigmoid(m(x, t, cond).logit) for x, t in zip(latents, timesteps)]).median()
            )
            + 1e-4
            for m in mods
        ]
    rules = [
        rule("c0", threshold=median[0]),
        rule("c1", threshold=median[1], sticky=False, strength=0.7),
        rule("c2", action="monitor", threshold=median[2]),
        rule("c3", threshold=median[3], replace_steps=0, escalate=1.5, escalate_max=3.0, move_pooled=False),
        rule("c4", threshold=median[4], confirm_checks=2, strength=2.0),
        rule("c5", threshold=median[5], escalate=2.0),
    ]
    concepts = [EngineConcept(r, m) for r, m in zip(rules, mods)]
    engine = RedirectionEngine(concepts)
    assert len(engine.groups) == 3 and [c.name for c in engine.concepts] == [r.concept for r in rules]
    expected, triggered, first, boost = reference_run(concepts, latents, timesteps, cond, steps)
    state = engine.init_state(cond)
    for step in range(steps):
        out, _, state = engine.step(latents[step], timesteps[step], cond, state)
        for a, e in zip(out.parts(), expected[step].parts()):
            assert torch.allclose(a, e, atol=1e-5, rtol=0), (step, float((a - e).abs().max()))
    decisions = engine.decisions(state)
    for i in range(b):
        for j, d in enumerate(decisions[i]):
            assert d.concept == rules[j].concept and d.triggered == bool(triggered[i, j])
            assert d.first_step == (int(first[i, j]) if first[i, j] >= 0 else None)
            assert d.escalation == pytest.approx(float(boost[i, j]))
    assert 0 < int(triggered.sum()) < triggered.numel(), "some but not all (sample, concept) pairs triggered"


def _ops_per_step(engine: RedirectionEngine, cfg: RedirectorConfig) -> int:
    latents, t, cond = inputs(cfg, 2)
    engine.step(latents, t, cond, engine.init_state(cond))  # warm-up (device copies of the rules' settings)
    state = engine.init_state(cond)
    return sum(kernel_ops(lambda: engine.step(latents, t, cond, state)).values())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ops_per_checked_step_do_not_grow_with_the_number_of_concepts(layout):
    cfg = config(layout)
    counts = {
        n: _ops_per_step(
            RedirectionEngine(
                [EngineConcept(rule(f"c{i}", threshold=1e-6), m) for i, m in enumerate(redirectors(cfg, n))]
            ),
            cfg,
        )
        for n in (1, 2, 3, 12)
    }
    assert counts[2] == counts[3] == counts[12], counts
    assert counts[1] <= counts[2], "one concept skips the copies a broadcast over K makes"


def test_weights_follow_the_latents_device():
    """Built on the CPU, stepped with tensors on another device (meta here: CUDA after a
    ``pipe.to("cuda")`` or CPU offload): the stacked weights are copied there once and reused."""
    cfg = config("sd")
    engine = RedirectionEngine([EngineConcept(rule("c0"), m) for m in redirectors(cfg, 1)])
    cond = Conditioning((torch.empty(2, 77, 32, device="meta"),))
    state = engine.init_state(cond)
    for _ in range(2):
        out, _, state = engine.step(
            torch.empty(2, 4, 16, 16, device="meta"), torch.tensor(0.5, device="meta"), cond, state
        )
    stack = engine.groups[0].stack
    assert (
        out.device.type == "meta"
        and stack.device.type == "cpu"
        and list(stack._copies) == [torch.device("meta")]
    )


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_stacked_forward_is_one_graph(layout):
    """``torch.compile(fullgraph=True)`` captures the whole stacked forward (no graph break: static
    shapes, no host reads), the precondition for CUDA graphs / ``mode="reduce-overhead"``."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    cfg = config(layout)
    stack = StackedRedirectors(redirectors(cfg, 3))
    latents, t, cond = inputs(cfg)
    eager = stack(latents, t, cond)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(stack.forward, fullgraph=True, backend="aot_eager")(latents, t, cond)
    assert counters["stats"]["unique_graphs"] == 1
    for a, b in zip(
        compiled.directions + (compiled.logit, compiled.alpha), eager.directions + (eager.logit, eager.alpha)
    ):
        assert torch.allclose(a, b, atol=1e-6)
