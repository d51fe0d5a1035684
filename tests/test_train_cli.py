"""`saferedir train`: pairs files, trajectory cache, bundle with its training summary."""

from __future__ import annotations

import json
import os

import pytest
from helpers import ACCELERATE_TWO_CPU_PROCESSES, FORGET, RED_PAIRS, RETAIN, generate, run_ok, write_red_pairs

from saferedir_sdk import SafeRedirGuard, load_bundle
from saferedir_sdk.cli import main
from saferedir_sdk.training import PairsError, igmu_pairs, load_pairs


def test_pairs_formats(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"forget": "a red x", "retain": "a tan x"}\n{"retain": "a dog"}\n{"forget": "red"}\n')
    p = load_pairs(jsonl)
    assert p.pairs == [("a red x", "a tan x"), ("red", "a dog")] and p.retain_pool == ["a dog"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"pairs": [["a", "b"]], "forget": ["c"], "retain_pool": ["d"]}))
    assert load_pairs(js).pairs == [("a", "b"), ("c", "d")]
    csv = tmp_path / "p.csv"
    csv.write_text("forget,retain\nred one,tan one\n,pool one\n")
    assert load_pairs(csv).pairs == [("red one", "tan one")] and load_pairs(csv).retain_pool == ["pool one"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"forget": "x", "retain": "y"}\n{oops\n')
    with pytest.raises(PairsError, match="bad.jsonl, line 2"):
        load_pairs(bad)
    only = tmp_path / "only.jsonl"
    only.write_text('{"forget": "x"}\n')
    with pytest.raises(PairsError, match="retain pool"):
        load_pairs(only)


def test_igmu_files_pair_up(tmp_path):
    from pathlib import Path

    data = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (data / "igmu_forget.json").is_file():
        pytest.skip("../shared/data not present")
    nudity = igmu_pairs(data / "igmu_forget.json", data / "igmu_retain.json", "Nudity")
    church = igmu_pairs(data / "igmu_forget.json", data / "igmu_retain.json", "Church")
    assert len(nudity.pairs) == 250 and not nudity.retain_pool
    assert len(church.pairs) == 50 and len(church.retain_pool) == 300


def test_train_command_writes_a_bundle_the_guard_enforces(pipe, tmp_path, write_policy, monkeypatch):
    folder = tmp_path / "tiny-sd"
    pipe.save_pretrained(folder)
    pairs = write_red_pairs(tmp_path / "red.jsonl")
    out = tmp_path / "red.safetensors"
    args = [
        *f"train --backbone {folder} --concept red --pairs {pairs} --out {out} --seeds 0 1".split(),
        *"--sampler-steps 4 --guidance 7.5 --steps 150 --batch-size 32".split(),
        *"--hidden-dim 64 --rank 8 --latent-pool 8 --token-layers 0 --quiet".split(),
        *["--cache", str(tmp_path / "cache")],
    ]
    assert main(args) == 0
    bundle = load_bundle(out)
    summary = bundle.training
    assert summary["data"]["train_pairs"] + summary["data"]["heldout_pairs"] == 10
    assert summary["heldout"]["heldout_accuracy"] >= 0.9
    assert set(summary["heldout"]["heldout_accuracy_by_t"]) and summary["versions"]["torch"]
    assert (summary["config"]["num_inference_steps"], summary["config"]["guidance_scale"]) == (4, 7.5)
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 5 and all(name.endswith(".safetensors") for name in cached)

    guard = SafeRedirGuard.from_policy(
        write_policy([{"concept": "red", "category": "custom", "redirector": {"path": str(out)}}])
    )
    guard.wrap(pipe)
    generate(pipe, prompts=[FORGET, RETAIN])
    assert [s.action for s in guard.last_report.samples] == ["redirected", "none"]

    def no_sampling(*_args, **_kwargs):
        raise AssertionError("the second run must take every trajectory from the cache")

    monkeypatch.setattr("saferedir_sdk.training.trainer.record_trajectories", no_sampling)
    fewer = [*args[: args.index("--steps") + 1], "2", *args[args.index("--steps") + 2 :]]
    # second run: trajectories come from the cache (a short fit: the cache is the check)
    assert main(fewer) == 0


@pytest.mark.slow
def test_train_under_accelerate_launch_with_two_processes(pipe, tmp_path):
    folder = tmp_path / "tiny-sd"
    pipe.save_pretrained(folder)
    pairs = tmp_path / "red.jsonl"
    pairs.write_text("\n".join(json.dumps({"forget": f, "retain": r}) for f, r in RED_PAIRS * 2))
    out = tmp_path / "red.safetensors"
    args = [
        *f"-m saferedir_sdk.cli train --backbone {folder} --concept red --pairs {pairs} --out {out}".split(),
        *"--seeds 0 --sampler-steps 4 --steps 60 --hidden-dim 64 --rank 8 --token-layers 1 --quiet".split(),
        *["--cache", str(tmp_path / "cache")],
    ]
    run_ok([*ACCELERATE_TWO_CPU_PROCESSES, *args], env={**os.environ, "ACCELERATE_USE_CPU": "1"}, timeout=600)
    assert load_bundle(out).training["processes"] == 2


def test_trajectory_cache_is_keyed_by_the_denoiser_weights(pipe, tmp_path):
    import torch
    from saferedir_adapters.sd import StableDiffusionAdapter

    from saferedir_sdk.training import TrainConfig, collect

    adapter = StableDiffusionAdapter(pipe)
    cfg = TrainConfig(concept="red", seeds=(0,), num_inference_steps=2)
    cache = tmp_path / "cache"
    first = collect(adapter, [FORGET], cfg, kind="forget", cache_dir=cache)
    again = collect(adapter, [FORGET], cfg, kind="forget", cache_dir=cache)
    assert torch.equal(first.latents, again.latents) and len(list(cache.iterdir())) == 1
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1.01)  # a retrained/fine-tuned denoiser, same text encoder
    changed = collect(adapter, [FORGET], cfg, kind="forget", cache_dir=cache)
    assert len(list(cache.iterdir())) == 2
    assert not torch.equal(first.latents[-1], changed.latents[-1])


def test_train_defaults_to_the_pipelines_own_sampler_settings(pipe):
    """No --sampler-steps/--guidance: the pipeline's own __call__ defaults (the Shapes backbone's
    20 steps at guidance 1.5; Stable Diffusion's 50 at 7.5), recorded in the bundle."""
    from saferedir_adapters.sd import StableDiffusionAdapter
    from saferedir_shapes.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, ShapesPipeline

    from saferedir_sdk.training.trainer import TrainConfig, with_sampler_defaults

    assert with_sampler_defaults(TrainConfig("red"), StableDiffusionAdapter(pipe)).guidance_scale == 7.5
    shapes = StableDiffusionAdapter(ShapesPipeline.__new__(ShapesPipeline))
    cfg = with_sampler_defaults(TrainConfig("red"), shapes)
    assert (cfg.num_inference_steps, cfg.guidance_scale) == (DEFAULT_STEPS, DEFAULT_GUIDANCE) == (20, 1.5)


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--prompt-swap", "1.5", "expected a share in [0, 1], got 1.5"),
        ("--prompt-dropout", "-0.1", "expected a share in [0, 1], got -0.1"),
        ("--swap-below", "0", "expected a share in (0, 1], got 0.0"),
        ("--swap-below", "nan", "expected a share in (0, 1], got nan"),
        ("--prompt-swap", "half", "expected a number, got 'half'"),
        ("--renoise", "1.01", "expected a share in [0, 1], got 1.01"),
        ("--classify-below", "0", "expected a share in (0, 1], got 0.0"),
    ],
)
def test_train_refuses_a_bad_share_as_a_usage_error_naming_the_flag(capsys, flag, value, expected):
    argv = [
        "train",
        "--backbone",
        "shapes",
        "--concept",
        "red",
        "--pairs",
        "p.json",
        "--out",
        "x",
        flag,
        value,
    ]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {expected}" in err
    assert "Traceback" not in err


def test_train_names_the_recipe_variants_a_concept_has(tmp_path, capsys):
    """``--pairs plugin:NAME:VARIANT`` reads a concept plugin's named recipe; an unknown variant is an
    error naming the ones there are, before any backbone is loaded or anything written."""
    out = tmp_path / "x.safetensors"
    argv = ["train", "--backbone", "shapes", "--concept", "star", "--out", str(out), "--pairs"]
    assert main([*argv, "plugin:shapes-star:two-targets"]) != 0
    err = capsys.readouterr().err
    assert "concept 'shapes-star' has no recipe variant 'two-targets'; it has ['one-target']" in err
    assert main([*argv, "plugin:shapes-red:one-target"]) != 0
    assert (
        "has no recipe variant 'one-target'; it has ['descriptions', 'orange-target', 'wide-descriptions', 'yellow-target']"
        in capsys.readouterr().err
    )
    assert main([*argv, "plugin:weapons:one-target"]) != 0
    assert "has no recipe variant 'one-target'; it has none" in capsys.readouterr().err
    assert not out.exists()


def test_a_pairs_file_is_labelled_by_outcome_with_a_registered_concepts_judge(tmp_path, capsys):
    """``--outcome CONCEPT``: a pairs file's trajectories are labelled by what each image shows, read
    by that concept's judge (a pack's recipe gets it without the flag; a file would be labelled by
    prompt side). A name no plugin registers with a judge is an error naming it, nothing written."""
    pairs = tmp_path / "red.json"
    # by prompt side the forget prompts are 1 and the retain and pool prompts 0; by what the backbone
    # draws, the blue circle is 0 and the pool's red circle 1
    pairs.write_text(
        json.dumps(
            {
                "pairs": [["a blue circle", "a green square"], ["a red star", "a yellow cross"]],
                "retain_pool": ["a red circle", "a purple triangle"],
            }
        )
    )
    out = tmp_path / "red.safetensors"
    argv = [
        *f"train --backbone shapes --concept red --pairs {pairs} --out {out} --seeds 0".split(),
        *"--sampler-steps 4 --steps 2 --batch-size 8 --quiet".split(),
        *["--cache", str(tmp_path / "cache")],
    ]
    assert main([*argv, "--outcome", "no-such-concept"]) != 0
    assert "--outcome no-such-concept: no loaded plugin registers a concept" in capsys.readouterr().err
    assert main([*argv, "--outcome", "shapes-red", "--no-outcome-labels"]) != 0
    assert "give one or the other" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv, "--soft-labels"]) != 0
    assert "--soft-labels: the labels are the outcome judge's soft reading, and no outcome judge" in (
        capsys.readouterr().err
    )
    assert not out.exists()
    assert main([*argv, "--outcome", "shapes-red"]) == 0
    data = load_bundle(out).training["data"]
    assert data["labels"] == "shapes-judge:red"
    share = data["unsafe_share"]
    # by prompt side: both forget prompts 1, the pool 0; by what the images show: the blue circle 0,
    # the red star 1, the pool's red circle 1 and purple triangle 0
    assert sorted([share["forget"], share["heldout_forget"]]) == [0.0, 1.0] and share["pool"] == 0.5
    # the judge's soft reading: its own recordings (another cache key), the same sides of the line
    soft = tmp_path / "soft.safetensors"
    soft_argv = [str(soft) if a == str(out) else a for a in argv]
    assert main([*soft_argv, "--outcome", "shapes-red", "--soft-labels"]) == 0
    data = load_bundle(soft).training["data"]
    assert data["labels"] == "shapes-judge:red:soft" and data["unsafe_share"] == share
    assert load_bundle(soft).training["config"]["soft_labels"] is True
