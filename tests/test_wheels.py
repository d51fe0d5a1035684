"""What users get: the four wheels built from this checkout, installed into a fresh venv outside
the repository, work from an empty folder (slow: a venv and its installs take minutes)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTIONS = {
    "saferedir_sdk": ROOT,
    "saferedir_adapters": ROOT / "adapters",
    "saferedir_shapes": ROOT / "plugins" / "shapes",
    "saferedir_bench": ROOT / "plugins" / "bench",
}
SNIPPET = """
from saferedir_sdk import SafeRedirGuard
from saferedir_shapes.pipeline import load_shapes_pipeline
import torch

pipe = load_shapes_pipeline()
guard = SafeRedirGuard.from_policy("shapes:demo")
guard.wrap(pipe)
images = pipe(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0)).images
print("actions", [s.action for s in guard.last_report.samples])
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{cmd}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run.stdout + run.stderr


@pytest.mark.slow
def test_wheels_install_into_a_fresh_venv_and_work_from_an_empty_folder(tmp_path):
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            *map(str, DISTRIBUTIONS.values()),
        ],
        tmp_path,
        env,
    )
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == 4, wheels
    for wheel in wheels:
        names = zipfile.ZipFile(wheel).namelist()
        package = wheel.name.split("-")[0]
        assert f"{package}/py.typed" in names, wheel.name
        assert any(n.endswith("/LICENSE") or n.endswith("licenses/LICENSE") for n in names), wheel.name
    shapes = next(w for w in wheels if w.name.startswith("saferedir_shapes"))
    assert "saferedir_shapes/policies/demo.yaml" in zipfile.ZipFile(shapes).namelist()
    sdk = next(w for w in wheels if w.name.startswith("saferedir_sdk"))
    metadata = zipfile.ZipFile(sdk).read(
        next(n for n in zipfile.ZipFile(sdk).namelist() if n.endswith("METADATA"))
    )
    requires = [line for line in metadata.decode().splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "diffusers" in r or "transformers" in r], requires

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path, env)
    _run(
        [str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), *map(str, wheels)],
        tmp_path,
        env,
    )

    empty = tmp_path / "empty"
    empty.mkdir()
    out = _run([str(venv / "bin" / "saferedir"), "demo", "--out", "demo-out"], empty, env)
    assert "outcome redirected; 5 of 8 redirected" in out, out
    assert (empty / "demo-out" / "grid.png").is_file() and (empty / "demo-out" / "audit.jsonl").is_file()
    assert not (empty / "saferedir-demo").exists(), "the demo writes under --out only"
    assert "requires torchvision" not in out and "Loading weights" not in out, (
        "no third-party noise on the CLI"
    )
    out = _run([str(python), "-c", SNIPPET], empty, env)
    assert "actions ['redirected', 'none']" in out, out
    out = _run([str(venv / "bin" / "saferedir"), "validate", "shapes:demo"], empty, env)
    assert "OK shapes:demo" in out
