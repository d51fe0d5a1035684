"""Fitting a redirector on the tiny pipeline's own trajectories, and the demo that uses it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import RED_PAIRS, STEPS
from saferedir_adapters.sd import StableDiffusionAdapter
from saferedir_adapters.tiny import RETAIN_POOL

from saferedir_sdk import Conditioning, Redirector, RedirectorConfig, TokenStream
from saferedir_sdk.capacity import Capacity
from saferedir_sdk.training import TrainConfig, Trajectories, fit_redirector, record_trajectories
from saferedir_sdk.training.fit import QUARTERS, evaluate_redirector, timestep_quarter

SMALL = Capacity(hidden_dim=64, rank=8, num_heads=4, latent_pool=8, token_layers=1)


def test_trajectories_line_up_and_fit_lowers_every_loss(pipe, tmp_path):
    adapter = StableDiffusionAdapter(pipe)
    kw = {"num_inference_steps": STEPS, "guidance_scale": 7.5}
    forget = record_trajectories(adapter, [f for f, _ in RED_PAIRS], seeds=[0, 1], **kw)
    retain = record_trajectories(adapter, [r for _, r in RED_PAIRS], seeds=[0, 1], **kw)
    pool = record_trajectories(adapter, RETAIN_POOL[1:], seeds=[0], **kw)
    n = len(RED_PAIRS) * 2 * STEPS
    assert len(forget) == len(retain) == n
    assert forget.cond.tokens[0].shape == (n, 77, 32) and forget.latents.shape == (n, 4, 32, 32)
    assert torch.equal(forget.steps, retain.steps) and torch.equal(forget.timesteps, retain.timesteps)
    assert 0.0 < float(forget.timesteps.min()) and float(forget.timesteps.max()) < 1.0, "normalised timesteps"
    assert torch.equal(forget.latents[0], retain.latents[0]), "paired rows share the seed's first latent"
    forget.save(tmp_path / "f.safetensors")
    again = Trajectories.load(tmp_path / "f.safetensors")
    assert torch.equal(again.cond.tokens[0], forget.cond.tokens[0]) and torch.equal(again.seeds, forget.seeds)
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig.for_backbone(adapter.fingerprint(), SMALL))
    result = fit_redirector(red, forget, retain, negatives=pool, steps=120, batch_size=32, log_every=119)
    first, last = result.history[0], result.history[-1]
    for key in ("classification", "redirection", "mask", "scale", "total"):
        assert last[key] < first[key], key
    assert last["accuracy"] == 1.0 and last["masked_cosine"] > first["masked_cosine"]
    assert not red.training and not any(p.requires_grad for p in red.parameters())
    held = evaluate_redirector(red, forget, retain)
    assert set(held["heldout_accuracy_by_t"]) <= set(QUARTERS)


def test_timestep_quarters_run_from_clean_to_noise():
    assert timestep_quarter(torch.tensor([0.0, 0.2, 0.26, 0.6, 0.999, 1.0])).tolist() == [0, 0, 1, 2, 3, 3]


def test_two_streams_and_a_pooled_embedding_train_together():
    """An SDXL-shaped conditioning (two token streams side by side and a pooled embedding): the
    losses cover every stream and the pooled part, and fitting learns the pairs' redirection."""
    g = torch.Generator().manual_seed(0)
    streams = (TokenStream("text_encoder", 6, 16), TokenStream("text_encoder_2", 6, 24))
    n = 64

    def traj(shift: float) -> Trajectories:
        base = torch.Generator().manual_seed(1)
        tokens = tuple(torch.randn(n, s.seq_len, s.dim, generator=base) for s in streams)
        pooled = torch.randn(n, 12, generator=base)
        tokens = (tokens[0].clone(), tokens[1].clone())
        tokens[0][:, 2] += shift * 3.0  # the concept word moves on both encoders and in the pooled vector
        tokens[1][:, 2] += shift * 3.0
        pooled = pooled + shift * 2.0
        latents = torch.randn(n, 4, 8, 8, generator=g) + shift
        return Trajectories(
            latents,
            torch.rand(n, generator=g),
            Conditioning(tokens, pooled),
            torch.zeros(n, dtype=torch.int64),
            torch.arange(n),
            torch.zeros(n, dtype=torch.int64),
        )

    forget, retain = traj(1.0), traj(0.0)
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig(streams, 4, pooled_dim=12, capacity=SMALL))
    result = fit_redirector(red, forget, retain, steps=150, batch_size=32, log_every=149)
    first, last = result.history[0], result.history[-1]
    assert last["accuracy"] == 1.0 and last["redirection"] < 0.5 * first["redirection"]
    out = red(*forget.select(torch.arange(4)).inputs("cpu"))
    assert out.pooled_direction.shape == (4, 12) and [d.shape[-1] for d in out.directions] == [16, 24]


def test_a_share_outside_its_range_is_refused_before_anything_is_trained():
    streams = (TokenStream("text_encoder", 4, 8),)
    rows = Trajectories(
        torch.randn(8, 4, 8, 8),
        torch.rand(8),
        Conditioning((torch.randn(8, 4, 8),)),
        torch.zeros(8, dtype=torch.int64),
        torch.arange(8),
        torch.zeros(8, dtype=torch.int64),
    )
    red = Redirector(RedirectorConfig(streams, 4, capacity=SMALL))
    before = {k: v.clone() for k, v in red.state_dict().items()}
    for kwargs, name in (
        ({"prompt_swap": 1.5}, "prompt_swap"),
        ({"prompt_dropout": -0.1}, "prompt_dropout"),
        ({"swap_below": 0.0}, "swap_below"),
        ({"renoise": 2.0}, "renoise"),
    ):
        with pytest.raises(ValueError, match=f"{name}: expected a share"):
            fit_redirector(red, rows, rows, steps=5, **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in red.state_dict().items())
    assert fit_redirector(red, rows, rows, steps=2, prompt_swap=1.0, swap_below=1.0).steps == 2
    with pytest.raises(ValueError, match="swap_below: expected a share"):
        TrainConfig("red", swap_below=1.5)


def test_demo_mechanics_runs_end_to_end(tmp_path, capsys):
    from saferedir_sdk.cli import main

    assert main(["demo-mechanics", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "a red circle   redirected" in out and "a blue star    blocked" in out
    rows = {" ".join(line.split()[:3]): line for line in out.splitlines() if line.startswith("  a ")}
    assert " 0.0% " in rows["a tan circle"] and " 0.0% " in rows["a blue moon"], (
        "benign samples are bit-identical"
    )
    records = [json.loads(x) for x in (tmp_path / "demo" / "audit.jsonl").read_text().splitlines()]
    records = [r for r in records if r["event"] == "saferedir.generation"]
    assert len(records) == 1 and records[0]["outcome"] == "blocked"
    assert (tmp_path / "demo" / "grid.png").stat().st_size > 0


def test_outcome_labels_decide_what_is_learnt(pipe):
    """Labelled by outcome: the classification target is each row's label, a pair teaches redirection
    only where its forget image shows the concept and its retain image does not, and every safe row
    (whatever its side) is kept still."""
    from saferedir_sdk.training import redirector_losses

    adapter = StableDiffusionAdapter(pipe)
    f = record_trajectories(adapter, [f for f, _ in RED_PAIRS[:2]], seeds=[0], num_inference_steps=2)
    r = record_trajectories(adapter, [r for _, r in RED_PAIRS[:2]], seeds=[0], num_inference_steps=2)
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig.for_backbone(adapter.fingerprint(), SMALL))
    n = len(f)
    by_side = redirector_losses(red, f.batch("cpu", 1.0), r.batch("cpu", 0.0))
    drawn_nowhere = redirector_losses(red, (*f.inputs("cpu"), torch.zeros(n)), r.batch("cpu", 0.0))
    assert float(drawn_nowhere["redirection"]) == 0.0 and float(drawn_nowhere["scale"]) == 0.0
    assert float(by_side["redirection"]) > 0.0
    # a forget row that was not drawn as the concept is a safe row: preservation covers it too
    assert float(drawn_nowhere["preservation"]) > float(by_side["preservation"])


def test_recorded_trajectories_carry_the_outcome_of_their_own_generation(pipe):
    adapter = StableDiffusionAdapter(pipe)
    seen = []

    def judge(images):  # a stand-in outcome judge: the first prompt's image "shows the concept"
        seen.append(images.shape)
        return np.array([True] + [False] * (len(images) - 1))

    rows = record_trajectories(
        adapter, ["a red circle", "a tan circle"], seeds=[0, 1], num_inference_steps=3, outcome=judge
    )
    assert seen == [(2, 64, 64, 3), (2, 64, 64, 3)]
    assert rows.labels.tolist() == [1.0, 0.0] * 6  # per step and seed, the label of that prompt's image


def test_a_soft_reading_labels_each_generation_with_its_doubt_and_no_reading_that_is_not_one_passes(pipe):
    """An outcome judge's soft reading (floats in [0, 1], ``OutcomeJudge.soft``) is each
    generation's label as it is; a NaN, a value outside [0, 1] or a verdict count that is not one
    per image is a ``ValueError`` naming it, never a label."""
    adapter = StableDiffusionAdapter(pipe)
    kw = {"seeds": [0], "num_inference_steps": 2}
    rows = record_trajectories(
        adapter, ["a red circle", "a tan circle"], outcome=lambda im: np.array([0.7, 0.2]), **kw
    )
    assert rows.labels.tolist() == pytest.approx([0.7, 0.2] * 2)
    for reading, match in (
        (np.array([0.7, np.nan]), r"expected verdicts in \[0, 1\], got nan for image 1"),
        (np.array([1.5, 0.2]), r"expected verdicts in \[0, 1\], got 1.5 for image 0"),
        (np.array([0.7]), r"expected one verdict per image \(2\), got shape \(1,\)"),
    ):
        with pytest.raises(ValueError, match=match):
            record_trajectories(
                adapter, ["a red circle", "a tan circle"], outcome=lambda im, r=reading: r, **kw
            )


def test_soft_labels_count_as_shown_above_one_half_and_need_a_judge_with_a_soft_reading(pipe, tmp_path):
    """A soft label above 0.5 is a row that shows the concept wherever accuracy or a share is
    counted; ``soft_labels`` takes the judge's soft reading (named ``NAME:soft``) and is refused,
    before anything is recorded or written, without a judge or with one that has none."""
    from saferedir_sdk.concepts import OutcomeJudge
    from saferedir_sdk.training import PromptPairs, TrainConfig, redirector_losses
    from saferedir_sdk.training.trainer import train_bundle

    adapter = StableDiffusionAdapter(pipe)
    f = record_trajectories(adapter, [f for f, _ in RED_PAIRS[:4]], seeds=[0], num_inference_steps=2)
    r = record_trajectories(adapter, [r for _, r in RED_PAIRS[:4]], seeds=[0], num_inference_steps=2)
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig.for_backbone(adapter.fingerprint(), SMALL))
    soft = torch.tensor([0.9, 0.6, 0.4, 0.1] * 2)
    hard = (soft > 0.5).float()
    a = redirector_losses(red, (*f.inputs("cpu"), soft), (*r.inputs("cpu"), 1 - soft))
    b = redirector_losses(red, (*f.inputs("cpu"), hard), (*r.inputs("cpu"), 1 - hard))
    assert float(a["accuracy"]) == float(b["accuracy"])
    assert float(a["classification"]) != float(b["classification"])  # the target is the reading
    judge = OutcomeJudge("redness", lambda im: np.ones(len(im), bool))
    with pytest.raises(ValueError, match="outcome judge 'redness': it has no soft reading"):
        judge.softened()
    softened = OutcomeJudge("redness", judge.judge, lambda im: np.full(len(im), 0.75)).softened()
    assert softened.name == "redness:soft" and softened(np.zeros((2, 4, 4, 3))).tolist() == [0.75, 0.75]
    cfg = TrainConfig(concept="red", seeds=(0,), num_inference_steps=STEPS, steps=1, soft_labels=True)
    out = tmp_path / "red.safetensors"
    for outcome, match in ((None, "no judge was given"), (judge, "it has no soft reading")):
        with pytest.raises(ValueError, match=match):
            train_bundle(
                pipe, PromptPairs(list(RED_PAIRS), []), cfg, out, cache_dir=tmp_path,
                outcome=outcome, progress=False,
            )  # fmt: skip
    assert not out.exists() and not list(tmp_path.iterdir())


def test_prompt_dropout_replaces_whole_prompts_with_the_neutral_one_and_keeps_the_labels():
    from saferedir_sdk.training.fit import _augment

    g = torch.Generator().manual_seed(0)
    cond = Conditioning((torch.randn(64, 5, 8),))
    neutral = Conditioning((torch.full((1, 5, 8), 7.0),))
    labels = torch.ones(64)
    batch = (torch.randn(64, 4, 2, 2), torch.rand(64), cond, labels)
    _, _, same, kept = _augment(batch, 0.0, 0.0, g, prompt_dropout=0.0, neutral=neutral)
    assert torch.equal(same.tokens[0], cond.tokens[0]) and torch.equal(kept, labels)
    _, _, mixed, kept = _augment(batch, 0.0, 0.0, g, prompt_dropout=0.5, neutral=neutral)
    blank = (mixed.tokens[0] == 7.0).all(dim=(1, 2))
    untouched = (mixed.tokens[0] == cond.tokens[0]).all(dim=(1, 2))
    assert bool((blank | untouched).all()) and 16 < int(blank.sum()) < 48 and torch.equal(kept, labels)


def _agreeing_pairs(n: int, seed: int) -> tuple[Trajectories, Trajectories, tuple[TokenStream, ...]]:
    """Late-schedule pairs whose words and latents agree (forget: the concept named and drawn,
    retain: neither), labelled by outcome, and their token stream."""
    g = torch.Generator().manual_seed(seed)
    streams = (TokenStream("text_encoder", 6, 16),)
    words = torch.randn(n, 6, 16, generator=g)

    def side(shown: float) -> Trajectories:
        tokens = words.clone()
        tokens[:, 2] += shown * 4.0  # the concept word
        latents = torch.randn(n, 4, 8, 8, generator=g)
        latents[:, 0, 2:6, 2:6] += shown * 1.5  # the concept forming in the image
        return Trajectories(
            latents,
            torch.full((n,), 0.2),
            Conditioning((tokens,)),
            torch.zeros(n, dtype=torch.int64),
            torch.arange(n),
            torch.zeros(n, dtype=torch.int64),
            torch.full((n,), shown),
        )

    return side(1.0), side(0.0), streams


def test_the_counterfactual_term_labels_each_latent_by_its_own_outcome_under_the_other_prompt():
    """``swap`` picks pairs also classified with their prompts exchanged: the forget latent under the
    retain prompt keeps the forget label and the other way round; nothing else changes."""
    from torch.nn import functional as F

    from saferedir_sdk.training import redirector_losses

    forget, retain, streams = _agreeing_pairs(8, 0)
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig(streams, 4, capacity=SMALL)).eval().requires_grad_(False)
    f, r = forget.batch("cpu", 1.0), retain.batch("cpu", 0.0)
    swap = torch.tensor([True, False] * 4)
    plain = redirector_losses(red, f, r)
    swapped = redirector_losses(red, f, r, swap=swap)
    expected = 0.5 * sum(
        F.binary_cross_entropy_with_logits(
            red(lat[0][swap], lat[1][swap], words[2].rows(swap)).logit, lat[3][swap]
        )
        for lat, words in ((f, r), (r, f))
    )
    assert float(plain["counterfactual"]) == 0.0
    assert abs(float(swapped["counterfactual"]) - float(expected)) < 1e-5
    for key in ("classification", "redirection", "mask", "scale", "preservation"):
        assert abs(float(swapped[key]) - float(plain[key])) < 1e-5, key
    assert abs(float(swapped["total"]) - float(plain["total"]) - float(expected)) < 1e-5


class _Reader(torch.nn.Module):
    """A stand-in classifier that decides from one input only: the concept word or the latent patch."""

    def __init__(self, reads: str):
        super().__init__()
        self.reads = reads
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, latents, timestep, cond):
        from types import SimpleNamespace

        if self.reads == "words":
            logit = cond.tokens[0][:, 2].mean(dim=-1) - 2.0
        else:
            logit = latents[:, 0, 2:6, 2:6].mean(dim=(1, 2)) - 0.75
        return SimpleNamespace(logit=logit + self.bias)


def test_the_ablation_tells_a_classifier_that_reads_the_words_from_one_that_reads_the_image():
    """Shuffled prompts (each latent keeping its label) cost a word reader half its accuracy and an
    image reader nothing; shuffled latents the other way round; the empty prompt leaves a word
    reader calling everything safe."""
    from saferedir_sdk.training import classifier_ablation

    forget, retain, _ = _agreeing_pairs(64, 3)
    rows = Trajectories.concat([forget, retain])
    neutral = Conditioning((torch.zeros(1, 6, 16),))
    late = "t0.00-0.25"
    words = classifier_ablation(_Reader("words"), rows, neutral=neutral)
    image = classifier_ablation(_Reader("image"), rows, neutral=neutral)
    assert words["real"][late] == words["shuffled_latent"][late] == 1.0
    assert min(image["real"][late], image["shuffled_prompt"][late], image["neutral_prompt"][late]) >= 0.98
    assert words["neutral_prompt"][late] == 0.5
    assert 0.35 < words["shuffled_prompt"][late] < 0.65 and 0.35 < image["shuffled_latent"][late] < 0.65


def test_a_classifier_that_reads_the_latent_alone_decides_from_the_image_and_still_redirects_the_words():
    """``classifier_reads="latent"``: p(unsafe) is the same under any prompt (the ablation's three
    prompt variants agree exactly), it learns the concept from the latent, and the redirection,
    which reads the prompt, still learns to move the concept word."""
    from dataclasses import replace

    from saferedir_sdk.training import classifier_ablation

    forget, retain, streams = _agreeing_pairs(64, 5)
    torch.manual_seed(0)
    red = Redirector(RedirectorConfig(streams, 4, capacity=replace(SMALL, classifier_reads="latent")))
    result = fit_redirector(red, forget, retain, steps=150, batch_size=32, log_every=149)
    first, last = result.history[0], result.history[-1]
    assert last["redirection"] < 0.5 * first["redirection"]
    held_f, held_r, _ = _agreeing_pairs(32, 6)
    rows = Trajectories.concat([held_f, held_r])
    figures = classifier_ablation(red, rows, neutral=Conditioning((torch.zeros(1, 6, 16),)))
    late = "t0.00-0.25"
    assert figures["real"][late] == figures["shuffled_prompt"][late] == figures["neutral_prompt"][late]
    assert figures["real"][late] >= 0.95 and figures["shuffled_latent"][late] < 0.7
    latents, t, cond = held_f.select(torch.arange(4)).inputs("cpu")
    other = held_r.select(torch.arange(4)).cond
    with torch.no_grad():
        a, b = red(latents, t, cond), red(latents, t, other)
    assert torch.equal(a.logit, b.logit) and not torch.allclose(a.directions[0], b.directions[0])


def test_capacity_names_an_unknown_classifier_input():
    with pytest.raises(
        ValueError, match=r"Capacity.classifier_reads: expected one of .*'latent'.*got 'words'"
    ):
        Capacity(classifier_reads="words")


def _mixed_generations(n: int, steps: int, seed: int) -> tuple[Trajectories, torch.Tensor, torch.Tensor]:
    """``n`` generations recorded over ``steps`` steps as a deterministic sampler's latents are, very
    nearly: ``z_s = a_s * final + b_s * start`` plus a small residual; rows ordered (seed, step,
    prompt). Returns the trajectories, the finals and the starting noises."""
    g = torch.Generator().manual_seed(seed)
    final, start = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 4, 8, 8, generator=g)
    t = torch.linspace(1.0, 0.0, steps)
    a, b = torch.cos(t * torch.pi / 2), torch.sin(t * torch.pi / 2)
    latents = torch.cat(
        [a[s] * final + b[s] * start + 0.01 * torch.randn(n, 4, 8, 8, generator=g) for s in range(steps)]
    )
    latents[:n], latents[-n:] = start, final  # the first step is the noise, the last the image
    traj = Trajectories(
        latents,
        t.repeat_interleave(n),
        Conditioning((torch.randn(n * steps, 6, 16, generator=g),)),
        torch.arange(steps).repeat_interleave(n),
        torch.arange(n).repeat(steps),
        torch.zeros(n * steps, dtype=torch.int64),
        torch.zeros(n * steps),
    )
    return traj, final, start


def test_the_renoiser_fits_each_step_and_swaps_only_the_starting_noise():
    from saferedir_sdk.training.renoise import Renoiser

    traj, final, start = _mixed_generations(16, 6, 0)
    renoiser = Renoiser.from_trajectories([traj])
    t = torch.linspace(1.0, 0.0, 6)
    for step, (a, b, r2) in renoiser.fit.items():
        assert abs(a - float(torch.cos(t[step] * torch.pi / 2))) < 0.01, step
        assert abs(b - float(torch.sin(t[step] * torch.pi / 2))) < 0.01 and r2 > 0.999, step
    assert renoiser.summary() == {"min_r2": min(r for _, _, r in renoiser.fit.values()), "noises": 16}
    index = torch.arange(16, 96)  # steps 1 to 5 of every generation
    rows = traj.select(index)
    every = torch.ones(len(index), dtype=torch.bool)
    own = renoiser.renoise(0, rows, index, index % 16, every)  # each row's own noise: unchanged
    assert torch.allclose(own.latents, rows.latents, atol=1e-6)
    other = (index + 3) % 16
    moved = renoiser.renoise(0, rows, index, other, every)
    b = torch.tensor([renoiser.fit[int(s)][1] for s in rows.steps]).reshape(-1, 1, 1, 1)
    assert torch.allclose(moved.latents - rows.latents, b * (start[other] - start[index % 16]), atol=1e-5)
    kept = renoiser.renoise(0, rows, index, other, torch.zeros(len(index), dtype=torch.bool))
    assert torch.equal(kept.latents, rows.latents)
    assert torch.equal(moved.labels, rows.labels) and torch.equal(moved.steps, rows.steps)


def test_renoising_keeps_a_latent_classifier_from_learning_the_training_noises_by_heart():
    """Labels that only the starting noise predicts on the training generations (the images are
    alike): without renoising a latent-only classifier learns them; with every row renoised it
    cannot, and stays near chance on the training rows."""
    from dataclasses import replace

    traj, _, _ = _mixed_generations(32, 6, 1)
    traj = replace(traj, labels=(traj.prompt_ids % 2).float())  # arbitrary per generation
    final = traj.latents[-32:]
    shared = final.mean(dim=0, keepdim=True)
    traj.latents[-32:] = shared  # every generation ends on the same image
    for s in range(1, 5):  # and its middle steps mix that image with its own noise
        rows = traj.steps == s
        a, b = (
            torch.cos(traj.timesteps[rows][0] * torch.pi / 2),
            torch.sin(traj.timesteps[rows][0] * torch.pi / 2),
        )
        traj.latents[rows] = a * shared + b * traj.latents[:32]
    streams = (TokenStream("text_encoder", 6, 16),)
    capacity = replace(SMALL, classifier_reads="latent")
    accuracy = {}
    for share in (0.0, 1.0):
        torch.manual_seed(0)
        red = Redirector(RedirectorConfig(streams, 4, capacity=capacity))
        fit_redirector(red, traj, traj, negatives=traj, steps=200, batch_size=32, renoise=share)
        latents, t, cond = traj.inputs("cpu")
        with torch.no_grad():
            hit = (red(latents, t, cond).logit > 0).float() == traj.labels
        accuracy[share] = float(hit[traj.steps == 2].float().mean())
    assert accuracy[0.0] >= 0.9 and accuracy[1.0] <= 0.75, accuracy
