"""Fixtures: tiny random-weights SD 1.x pipelines and redirectors fitted on them.

Nothing is faked: the redirectors are real modules trained (in seconds) on trajectories the
tiny pipeline's own sampler produced, and the guard runs the real engine through the real hook.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import FAMILIES, RED_PAIRS, STAR_PAIRS, STEPS
from saferedir_adapters.sd import StableDiffusionAdapter
from saferedir_adapters.tiny import TINY_CAPACITY, fit_tiny_redirector, tiny_adapter, tiny_sd_pipeline

from saferedir_sdk import ConceptInfo, save_bundle

warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """Two bundles fitted on the tiny pipeline (seed 0): 'red' and 'star'."""
    folder = tmp_path_factory.mktemp("bundles")
    return {name: _fitted(folder, name, pairs) for name, pairs in (("red", RED_PAIRS), ("star", STAR_PAIRS))}


def _fitted(folder: Path, name: str, pairs, capacity=TINY_CAPACITY) -> Path:
    """A bundle for ``name`` fitted on the tiny pipeline (seed 0), saved under ``folder``."""
    pipe = tiny_sd_pipeline(0)
    path = folder / f"{name}.safetensors"
    redirector = fit_tiny_redirector(pipe, pairs, num_inference_steps=STEPS, capacity=capacity)
    save_bundle(
        path,
        redirector,
        ConceptInfo(name, "custom"),
        StableDiffusionAdapter(pipe).fingerprint(),
        {"test": True},
    )
    return path


class _FamilyBundles(dict):
    """family -> path of a red bundle fitted on that family's tiny pipeline (:data:`helpers.FAMILIES`),
    fitted the first time a test asks for it (``known``: bundles already fitted so)."""

    def __init__(self, folder: Path, known: dict[str, str]):
        super().__init__(known)
        self.folder = folder

    def __missing__(self, family: str) -> str:
        pipe = FAMILIES[family]()
        redirector = fit_tiny_redirector(pipe, RED_PAIRS, num_inference_steps=STEPS)
        path = str(self.folder / f"red-{family}.safetensors")
        save_bundle(path, redirector, ConceptInfo("red", "custom"), tiny_adapter(pipe).fingerprint())
        self[family] = path
        return path


@pytest.fixture(scope="session")
def family_bundles(tmp_path_factory, bundles) -> dict[str, str]:
    # sd1's is the session's red bundle: the same fit (pipeline, pairs, seeds, capacity)
    return _FamilyBundles(tmp_path_factory.mktemp("family-bundles"), {"sd1": str(bundles["red"])})


@pytest.fixture(scope="session")
def latent_red(tmp_path_factory) -> dict[str, Path]:
    """A red bundle fitted on the tiny pipeline (seed 0) whose classifier reads the latent alone."""
    capacity = replace(TINY_CAPACITY, classifier_reads="latent")
    return {"red": _fitted(tmp_path_factory.mktemp("latent"), "red", RED_PAIRS, capacity)}


@pytest.fixture
def pipe():
    return tiny_sd_pipeline(0)


@pytest.fixture
def write_policy(tmp_path, bundles):
    """write_policy(concepts=[...], **top) -> path of a policy YAML whose audit goes to tmp_path/audit.jsonl."""

    def _write(concepts=None, **top) -> Path:
        if concepts is None:
            concepts = [{"concept": "red", "category": "custom", "redirector": {"path": str(bundles["red"])}}]
        doc = {
            "version": 1,
            "name": "test",
            "audit": {"sinks": ["file"], "file": str(tmp_path / "audit.jsonl")},
        }
        doc.update(top)
        doc["concepts"] = concepts
        path = tmp_path / f"policy-{len(list(tmp_path.glob('policy-*.yaml')))}.yaml"
        path.write_text(json.dumps(doc))  # JSON is YAML
        return path

    return _write


@pytest.fixture
def audit_records(tmp_path):
    def _read(event: str | None = "saferedir.generation") -> list[dict]:
        """The audit file's records of ``event`` (None: every record: start records too)."""
        path = tmp_path / "audit.jsonl"
        records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
        return [r for r in records if event is None or r["event"] == event]

    return _read
