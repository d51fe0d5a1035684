"""``saferedir plugins new NAME`` (issue #14): the pack it writes passes its own tests as written,
and (slow) installs from a wheel into a throwaway venv, is discovered, trains a bundle for the
Shapes backbone from its recipe, and a policy naming it erases the concept."""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path

import pytest
from helpers import run_ok

from saferedir_sdk import SafeRedirError
from saferedir_sdk.cli import main
from saferedir_sdk.scaffold import build_recipe, write_pack

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the ACME logo", "an ACME emblem"]
NEIGHBOURS = ["a plain logo", "a generic emblem"]


def test_the_scaffold_writes_a_pack_whose_own_tests_pass(tmp_path, capsys):
    assert main(["plugins", "new", "acme-logo", "--dir", str(tmp_path), "--category", "object",
                 "--words", ",".join(WORDS), "--neighbours", ",".join(NEIGHBOURS)]) == 0  # fmt: skip
    pack = tmp_path / "saferedir-acme-logo"
    assert str(pack) in capsys.readouterr().out
    files = sorted(str(p.relative_to(pack)) for p in pack.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "pyproject.toml",
        "saferedir_acme_logo/__init__.py",
        "saferedir_acme_logo/bundles/README.md",
        "saferedir_acme_logo/plugin.py",
        "saferedir_acme_logo/policies/default.yaml",
        "saferedir_acme_logo/recipe.json",
        "tests/test_saferedir_acme_logo.py",
    ]
    assert 'acme-logo = "saferedir_acme_logo.plugin"' in (pack / "pyproject.toml").read_text()
    env = {**os.environ, "PYTHONPATH": str(pack)}
    run = run_ok(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pack / "tests")], env=env
    )
    assert "5 passed, 1 skipped" in run.stdout  # skipped: the entry-point check needs it installed
    assert main(["validate", str(pack / "saferedir_acme_logo" / "policies" / "default.yaml")]) == 0


def test_the_recipe_holds_out_the_last_quarter_of_the_templates():
    templates = ["a {}", "an image of {}", "{} on paper", "a drawing of {}", "{}"]
    recipe = build_recipe(["x thing"], ["y thing"], templates, ["a tree"])
    assert recipe["pairs"] == [[t.format("x thing"), t.format("y thing")] for t in templates[:4]]
    assert recipe["held_out"] == {"forget": ["x thing"], "retain": ["y thing"]}
    assert recipe["pool"] == [t.format("a tree") for t in templates[:4]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "Acme_Logo"}, "lowercase letters, digits and single hyphens"),
        ({"neighbours": ["one"]}, "the same number of entries"),
        ({"templates": ["no slot", "a {}"]}, "needs exactly one '{}'"),
        ({"category": "weird"}, "weird"),
    ],
)
def test_bad_scaffold_input_is_a_typed_error_and_writes_nothing(tmp_path, kwargs, message):
    args = {"name": "acme-logo", "words": WORDS, "neighbours": NEIGHBOURS, **kwargs}
    with pytest.raises((SafeRedirError, ValueError), match=message):
        write_pack(args.pop("name"), tmp_path, **args)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_pack_folder_is_never_overwritten(tmp_path):
    write_pack("acme-logo", tmp_path, words=WORDS, neighbours=NEIGHBOURS)
    recipe = tmp_path / "saferedir-acme-logo" / "saferedir_acme_logo" / "recipe.json"
    recipe.write_text("{}")
    with pytest.raises(SafeRedirError, match="already exists"):
        write_pack("acme-logo", tmp_path, words=WORDS, neighbours=NEIGHBOURS)
    assert recipe.read_text() == "{}"


# -- end to end (slow): wheel -> throwaway venv -> discovered -> trained -> erases --------------

BLUE = ["blue circle", "blue square", "blue triangle", "blue star", "azure circle", "navy square"]
NOT_BLUE = ["green circle", "green square", "green triangle", "green star", "yellow circle", "orange square"]
TEMPLATES = ["a {}", "an image of a {}", "a {} on a white background", "{}", "a drawing of a {}"]
POOL = ["red circle", "yellow star", "purple triangle", "orange cross", "green square", "red square"]
CHECK = """
import json, sys
import numpy as np, torch
from saferedir_sdk import SafeRedirGuard
from saferedir_shapes.judge import judge_images, load_judge
from saferedir_shapes.pipeline import load_shapes_pipeline

held_out = json.loads(sys.argv[1])
prompts = held_out["forget"] + held_out["retain"]
pipe, judge = load_shapes_pipeline(), load_judge()

def colours():
    images = pipe(prompts * 4, num_inference_steps=20, guidance_scale=1.5, output_type="np",
                  generator=torch.Generator().manual_seed(3)).images
    return judge_images(judge, (images * 255).round().astype(np.uint8))["colour"]

before = colours()
guard = SafeRedirGuard.from_policy("shapes-blue:default")
guard.wrap(pipe)
after = colours()
n = len(held_out["forget"])
forget = [i for i in range(len(before)) if i % len(prompts) < n]
retain = [i for i in range(len(before)) if i % len(prompts) >= n]
print(json.dumps({
    "forget_drawn_blue": sum(before[i] == "blue" for i in forget),
    "forget_still_blue": sum(before[i] == "blue" and after[i] == "blue" for i in forget),
    "retain": len(retain),
    "retain_changed_colour": sum(before[i] != after[i] for i in retain),
    "plugins": guard.plugin_manager.list_name_plugin().__len__(),
}))
"""


@pytest.mark.slow
def test_a_scaffolded_pack_installs_from_a_wheel_trains_on_shapes_and_erases(tmp_path):
    pack = write_pack(
        "shapes-blue",
        tmp_path / "src",
        description="blue shapes",
        words=BLUE,
        neighbours=NOT_BLUE,
        templates=TEMPLATES,
        pool=POOL,
    )
    venv = tmp_path / "venv"
    run_ok([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    site = run_ok([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # the throwaway venv sees this environment's packages (torch, the SDK, Shapes; editable installs
    # too, whose own .pth files only a site dir processes) through a .pth that adds it as one
    parent = sysconfig.get_paths()["purelib"]
    Path(site, "parent-env.pth").write_text(f"import site; site.addsitedir({parent!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["SAFEREDIR_PLUGINS"] = "saferedir-adapters,saferedir-shapes,saferedir-shapes-blue"

    def install() -> None:
        wheels = tmp_path / "wheels"
        run_ok([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                "-w", str(wheels), str(pack)], env=env)  # fmt: skip
        run_ok([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                "--force-reinstall", "--no-deps", "saferedir-shapes-blue"], env=env, cwd=tmp_path)  # fmt: skip

    install()
    cli = [py, "-c", "import sys; from saferedir_sdk.cli import main; sys.exit(main(sys.argv[1:]))"]
    listing = run_ok([*cli, "plugins"], env=env, cwd=tmp_path).stdout
    assert "loaded  shapes-blue" in listing and "saferedir-shapes-blue 0.1.0" in listing
    assert "shapes-blue" in listing.split("concepts:")[1]
    run_ok([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pack / "tests")], env=env, cwd=tmp_path)

    bundle = pack / "saferedir_shapes_blue" / "bundles" / "shapes-blue.shapes.safetensors"
    run_ok(
        [*cli, "train", "--backbone", "shapes", "--pairs", "plugin:shapes-blue", "--concept", "shapes-blue",
         "--out", str(bundle), "--steps", "600", "--patience", "0", "--latent-readout", "mean+max",
         "--seeds", "0", "1", "--no-cache", "--quiet"],
        env=env, cwd=tmp_path, timeout=1800,
    )  # fmt: skip
    install()  # the bundle now ships in the wheel
    held_out = json.loads((pack / "saferedir_shapes_blue" / "recipe.json").read_text())["held_out"]
    result = json.loads(
        run_ok([py, "-c", CHECK, json.dumps(held_out)], env=env, cwd=tmp_path).stdout.strip().splitlines()[-1]
    )
    print("scaffolded pack, held-out prompts:", result)
    assert result["forget_drawn_blue"] >= 12
    assert result["forget_still_blue"] <= 0.2 * result["forget_drawn_blue"]
    assert result["retain_changed_colour"] <= 0.2 * result["retain"]
