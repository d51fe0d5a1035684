"""benchmarks/decision_sweep.py's variants: each is the policy with exactly the overrides it names,
and still a valid policy, so a row of the sweep measures the setting its label says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from saferedir_sdk.policy import load_policy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from deciding_checks import flagged  # noqa: E402
from decision_sweep import variant_policy  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "plugins/shapes/saferedir_shapes/policies/demo.yaml"


def _rules(path: Path) -> dict:
    return {r.concept: r for r in load_policy(path).policy.concepts}


def test_a_variant_sets_defaults_per_concept_fields_and_bundles(tmp_path):
    base = _rules(variant_policy(DEMO, "base", tmp_path, "base"))
    path = variant_policy(
        DEMO,
        "strength=1.2 red:window.start=8 window.stop=19 striped:threshold=0.85 star:bundle=x.safetensors",
        tmp_path,
        "v",
    )
    policy = load_policy(path).policy
    rules = {r.concept: r for r in policy.concepts}
    assert policy.defaults.strength == 1.2
    assert (rules["red"].window.start, rules["red"].window.stop) == (8, 19)
    assert (rules["striped"].window.start, rules["striped"].window.stop) == (base["striped"].window.start, 19)
    assert rules["striped"].threshold == 0.85 and rules["red"].threshold == base["red"].threshold == 0.8
    assert rules["star"].threshold == base["star"].threshold == 0.5  # striped's override stays its own
    assert rules["star"].redirector.path == str(Path("x.safetensors").resolve())
    assert rules["star"].redirector.plugin is None and rules["red"].redirector == base["red"].redirector
    monitor = load_policy(variant_policy(DEMO, "base", tmp_path, "m", monitor=True)).policy
    assert {r.action for r in monitor.concepts} == {"monitor"}
    assert base["star"].rewind and not any(r.effective(monitor.defaults).rewind for r in monitor.concepts)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ("threshold", "is not key=value"),
        ("blue:threshold=0.6", "no rule for 'blue'"),
        ("bundle=x.safetensors", "needs a concept"),
    ],
)
def test_a_variant_that_names_nothing_real_is_refused(tmp_path, overrides, message):
    with pytest.raises(SystemExit, match=message):
        variant_policy(DEMO, overrides, tmp_path, "v")


P = [0.95, 0.2, 0.95, 0.95, 0.95, 0.1, 0.95, 0.1]
T = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]


@pytest.mark.parametrize(
    "decide_at_t, confirm, every, expected",
    [
        (1.0, 2, 1, True),  # steps 2 and 3
        (0.5, 2, 1, False),  # from step 4 on the hits never come two in a row
        (0.5, 1, 1, True),
        (0.6, 2, 2, True),  # checks at steps 4 and 6 (t 0.5, 0.3): both hit
        (0.2, 1, 1, False),  # the one deciding check (step 7) misses
    ],
)
def test_deciding_checks_flags_as_a_rewind_rules_first_run(decide_at_t, confirm, every, expected):
    """benchmarks/deciding_checks.py's first-run rule: ``confirm`` hits in a row among the checks
    (every ``every`` steps from step 0) at a noise level <= ``decide_at_t``."""
    assert flagged(P, T, 0.9, decide_at_t, confirm, every) is expected


def test_target_swap_writes_the_prompt_the_heads_are_fitted_to_reach():
    """benchmarks/redirection_quality.py --target-swap: the concept's first dictionary word (training
    or held-out synonym, the longest match) becomes the recipe's target; a prompt with no such word
    (a description, a misspelling) has no swap, so it is left out of the comparison."""
    from redirection_quality import target_swap
    from saferedir_shapes.eval_suite import ShapesEvalSuite

    concepts = {c.name: c for c in ShapesEvalSuite.build(n=1).concepts}
    red, striped = target_swap(concepts["red"]), target_swap(concepts["striped"])
    assert red("a scarlet striped asterisk") == "a purple striped asterisk"
    assert red("a blood red star, red again") == "a purple star, red again"
    assert red("a star the colour of blood") is None and red("a bored square") is None
    assert striped("a zebra-striped red disc") == "a plain red disc"
    assert striped("a banded-ish star") is None  # a word of its own, not "banded"
    assert target_swap(concepts["red"], "green")("a scarlet striped asterisk") == "a green striped asterisk"


def test_mean_of_averages_the_scores_of_fits_on_the_same_prompts(tmp_path, capsys):
    """``deciding_checks.py --mean-of``: the per-step mean of several ``--out`` files' scores, and
    the frontier over it; files scored on other prompts are refused, naming the file."""
    from deciding_checks import frontier, mean_of

    def entry(set_name, shows, real):
        return {
            "set": set_name,
            "text": set_name + str(real),
            "shows": shows,
            "t": [0.5, 0.3],
            "real": real,
            "empty": real,
        }

    a = {"striped": [entry("forget", True, [0.2, 0.9]), entry("retain", False, [0.1, 0.6])]}
    b = {"striped": [{**a["striped"][0], "real": [0.4, 0.5]}, {**a["striped"][1], "real": [0.3, 0.2]}]}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, data in zip(paths, (a, b)):
        path.write_text(json.dumps(data))
    (drawn, benign) = mean_of(paths)["striped"]
    assert drawn["real"] == [0.3, 0.7] and benign["real"] == [0.2, 0.4]
    # the mean flags the drawn image at t 0.3 from threshold 0.7 and the benign one below 0.4
    line = frontier([drawn, benign], every=1, benign_at_most=(0,))
    assert line == (
        "fewest drawn never flagged, benign <= 0: 0 never flagged (0 benign; t 0.3, threshold 0.5, 1 in a row)"
    )
    other = tmp_path / "c.json"
    other.write_text(
        json.dumps({"striped": [{**a["striped"][0], "text": "another prompt"}, a["striped"][1]]})
    )
    with pytest.raises(SystemExit, match="c.json does not score 'striped'"):
        mean_of([paths[0], other])


def test_deciding_checks_counts_a_wordings_file_by_what_each_image_shows_on_any_grid():
    """``deciding_checks.py --prompts``: a wordings file's prompts the backbone drew as the concept
    are the drawn ones and every other one benign (a split's forget prompts not drawn are neither);
    ``--decide-at``, ``--thresholds``, ``--confirms`` set the grid of rules counted."""
    from deciding_checks import WORDINGS_SET, counts

    t = [0.5, 0.3, 0.1]
    drawn = {"set": WORDINGS_SET, "shows": True, "t": t, "real": [0.1, 0.92, 0.95]}
    other = {"set": WORDINGS_SET, "shows": False, "t": t, "real": [0.1, 0.95, 0.2]}
    undrawn = {"set": "forget", "shows": False, "t": t, "real": [0.99, 0.99, 0.99]}
    cells = counts([drawn, other, undrawn], 1, "real", (0.35,), (0.9, 0.93), (1, 2))
    assert cells == {
        (0.35, 0.9, 1): (0, 1),  # the benign wording hits once at t 0.3
        (0.35, 0.9, 2): (0, 0),
        (0.35, 0.93, 1): (0, 1),
        (0.35, 0.93, 2): (1, 0),  # 0.92 then 0.95: not two in a row at 0.93
    }


def test_local_swap_moves_only_the_states_of_the_tokens_the_swap_changes(pipe):
    """benchmarks/redirection_quality.py --local-swap: a row whose swap tokenises to as many tokens
    takes the swapped prompt's states at the changed positions only; a row with no swap, or one
    whose swap changes the token count, keeps its own conditioning."""
    import torch
    from redirection_quality import local_swap
    from saferedir_adapters.sd import StableDiffusionAdapter

    adapter = StableDiffusionAdapter(pipe)
    texts = ["a red square on grey", "a red square", "a red square"]
    swapped = ["a tan square on grey", None, "a tan or beige square"]
    aligned, cond = local_swap(adapter, texts, swapped)
    own = adapter.encode_prompts(texts)[0].tokens[0]
    other = adapter.encode_prompts(swapped[:1])[0].tokens[0][0]
    assert aligned == [True, False, False]
    moved = (cond.tokens[0] != own).any(-1)
    a, b = (pipe.tokenizer(t)["input_ids"] for t in (texts[0], swapped[0]))
    differ = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]  # "red" -> "tan"
    assert differ and moved[0].nonzero().flatten().tolist() == differ
    assert torch.equal(cond.tokens[0][0, differ], other[differ]) and not moved[1:].any()


def test_layer_scoped_moves_only_the_cross_attention_layers_it_names(pipe):
    """benchmarks/redirection_quality.py --layer-swap: a call conditioned on the target prompt has
    the target's states read by the cross-attention layers under the named prefixes only; the
    others read the prompt's own rows, the unconditional rows stay as they were; the hooks go away
    with the context, and a prefix naming no cross-attention layer is refused by name."""
    import torch
    from redirection_quality import cross_attention_layers, layer_scoped
    from saferedir_adapters.sd import StableDiffusionAdapter

    adapter = StableDiffusionAdapter(pipe)
    own = adapter.encode_prompts(["a red square", "a red circle"])[0]
    target = adapter.encode_prompts(["a tan square", "a tan circle"])[0]
    layers = cross_attention_layers(pipe.unet)
    inside = [n for n in layers if n.startswith("down_blocks.")]
    assert inside and len(inside) < len(layers)
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        return lambda _m, args, kwargs: seen.__setitem__(name, kwargs["encoder_hidden_states"].clone())

    with layer_scoped(pipe.unet, ["down_blocks"], own.tokens[0], target.tokens[0]):
        handles = [m.register_forward_pre_hook(record(n), with_kwargs=True) for n, m in layers.items()]
        adapter.generate(
            ["a tan square", "a tan circle"], seed=0, num_inference_steps=2, guidance_scale=5.0, cond=target
        )
        for h in handles:
            h.remove()
    assert not any(m._forward_pre_hooks for m in layers.values())
    cond_rows = slice(2, 4)  # classifier-free guidance: unconditional rows first
    for name, states in seen.items():
        want = target.tokens[0] if name in inside else own.tokens[0]
        assert torch.equal(states[cond_rows], want.to(states)), name
        assert not torch.equal(states[0], own.tokens[0][0].to(states)), name  # the empty prompt's row
    with pytest.raises(ValueError, match="no cross-attention layer under 'middle'"):
        with layer_scoped(pipe.unet, ["middle"], own.tokens[0], target.tokens[0]):
            pass


def test_layer_scoped_with_release_t_moves_every_layer_only_above_it(pipe):
    """benchmarks/redirection_quality.py --time-swap: with ``release_t`` every cross-attention layer
    reads the target's rows at the steps whose normalised timestep is above it and the prompt's own
    from it down; the denoiser's timestep hook goes away with the context."""
    import torch
    from redirection_quality import cross_attention_layers, layer_scoped
    from saferedir_adapters.sd import StableDiffusionAdapter

    adapter = StableDiffusionAdapter(pipe)
    own = adapter.encode_prompts(["a red square"])[0]
    target = adapter.encode_prompts(["a tan square"])[0]
    layers = cross_attention_layers(pipe.unet)
    steps: list[float] = []
    read: list[set[str]] = []  # per denoiser call: which rows the layers read

    def note(_m, args, kwargs):
        steps.append(float(args[1] if len(args) > 1 else kwargs["timestep"]) / 1000)
        read.append(set())

    def record(_m, args, kwargs):
        row = kwargs["encoder_hidden_states"][1]
        read[-1].add("target" if torch.equal(row, target.tokens[0][0].to(row)) else "own")

    with layer_scoped(
        pipe.unet, None, own.tokens[0], target.tokens[0], release_t=0.6, num_train_timesteps=1000
    ):
        handles = [pipe.unet.register_forward_pre_hook(note, with_kwargs=True)]
        handles += [m.register_forward_pre_hook(record, with_kwargs=True) for m in layers.values()]
        adapter.generate(["a tan square"], seed=0, num_inference_steps=3, guidance_scale=5.0, cond=target)
        for h in handles:
            h.remove()
    assert not pipe.unet._forward_pre_hooks and not any(m._forward_pre_hooks for m in layers.values())
    assert any(t > 0.6 for t in steps) and any(t <= 0.6 for t in steps), steps
    assert read == [{"target"} if t > 0.6 else {"own"} for t in steps], (steps, read)


def test_gates_override_what_the_heads_veto_and_are_restored(tmp_path):
    """benchmarks/redirection_quality.py --gates: ``heads`` applies the predicted alpha and masks
    (zero here: nothing moves), ``all`` moves every token, ``fallback`` moves every token only where
    the mask sees no concept token; the engine's own function is back after the context.
    ``--prompts``: a line that is not ``kind<TAB>text`` is refused by file and line."""
    import torch
    from redirection_quality import gated
    from saferedir_shapes.eval_suite import ShapesEvalSuite
    from shapes_suite import wordings

    import saferedir_sdk.engine as engine
    from saferedir_sdk.conditioning import Conditioning
    from saferedir_sdk.redirector import RedirectorOutput

    tokens = torch.randn(2, 4, 8)
    weak, strong = torch.zeros(4), torch.tensor([0.0, 0.9, 0.0, 0.0])
    out = RedirectorOutput(
        logit=torch.ones(2),
        directions=(torch.randn(2, 4, 8),),
        masks=(torch.stack([weak, strong]),),
        alpha=torch.zeros(2),
    )
    cond = Conditioning((tokens,), None)
    before = engine.redirection
    moved = {}
    for mode in ("heads", "alpha", "fallback", "all"):
        with gated(mode):
            delta = engine.redirection(cond, out, 1.0).tokens[0]
        moved[mode] = (delta.abs().sum(-1) > 0).tolist()
    assert engine.redirection is before
    assert moved["heads"] == [[False] * 4, [False] * 4]
    assert moved["alpha"] == [[False] * 4, [False, True, False, False]]
    assert moved["fallback"] == [[True] * 4, [False, True, False, False]]
    assert moved["all"] == [[True] * 4, [True] * 4]
    with pytest.raises(ValueError, match="--gates"):
        with gated("none"):
            pass
    red = ShapesEvalSuite.build(n=1).concepts[0]
    good = tmp_path / "w.tsv"
    good.write_text("# comment\nsynonym\ta garnet square\n", encoding="utf-8")
    assert [(p.kind, p.text) for p in wordings(red, good).sets["forget"]] == [("synonym", "a garnet square")]
    bad = tmp_path / "bad.tsv"
    bad.write_text("a garnet square\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.tsv:1"):
        wordings(red, bad)
