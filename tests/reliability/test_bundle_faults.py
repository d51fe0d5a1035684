"""Hostile and corrupted bundle files (issue #12, item 3; item 13's RNG): only the project's typed
errors come out, quickly, with bounded messages; a bundle never moves the caller's RNG; a rule is
enforced only by a bundle trained for its concept and category."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from saferedir_sdk import (
    BackboneFingerprint,
    BundleConceptMismatchError,
    BundleError,
    BundleFormatError,
    ConceptInfo,
    GuardBuildError,
    Redirector,
    RedirectorConfig,
    SafeRedirGuard,
    TextEncoderPrint,
    TokenStream,
    load_bundle,
    save_bundle,
)
from saferedir_sdk.capacity import Capacity

TINY = Capacity(hidden_dim=32, rank=4, num_heads=2, latent_pool=4, token_layers=1)
FP = BackboneFingerprint(
    (TokenStream("text_encoder", 8, 16),),
    0,
    4,
    (TextEncoderPrint("text_encoder", "a" * 64, "b" * 64),),
    "sd1",
)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bundle") / "good.safetensors"
    save_bundle(path, Redirector(RedirectorConfig.for_backbone(FP, TINY)), ConceptInfo("red", "nsfw"), FP)
    return path


def _parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata())


def _expect_typed(path: Path) -> None:
    """Loading ``path`` succeeds or raises a BundleError: within 2 s, with a message under 10 kB."""
    start = time.perf_counter()
    try:
        load_bundle(path)
    except BundleError as exc:
        assert len(str(exc)) < 10_000
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "key, value",
    [
        ("saferedir.backbone", '"sd1"'),
        ("saferedir.backbone", "[1, 2]"),
        ("saferedir.config", "7"),
        ("saferedir.concept", '"red"'),
        ("saferedir.training", "null"),
        ("saferedir.concept", '{"name": "red", "category": "nsfw", "extra": 1}'),
        ("saferedir.backbone", '{"streams": "abc", "pooled_dim": 0, "latent_channels": 4, "encoders": []}'),
        ("saferedir.config", "[" * 100_000),
    ],
)
def test_metadata_of_the_wrong_type_is_a_format_error_naming_the_file(good, tmp_path, key, value):
    tensors, metadata = _parts(good)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, key: value})
    with pytest.raises(BundleFormatError, match="bad.safetensors"):
        load_bundle(bad)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.half(), "dtype float32"),
        (lambda t: t.to(torch.int64), "dtype float32"),
        (lambda t: t * 1e30, "magnitude"),
        (lambda t: t.fill_(float("nan")), "NaN"),
    ],
)
def test_weights_of_the_wrong_kind_are_refused(good, tmp_path, change, message):
    tensors, metadata = _parts(good)
    key = next(k for k in tensors if k.endswith("weight"))
    bad = tmp_path / "bad.safetensors"
    save_file({**tensors, key: change(tensors[key].clone())}, str(bad), metadata=metadata)
    with pytest.raises(BundleFormatError, match=message):
        load_bundle(bad)


def test_all_zero_weights_are_not_a_trained_redirector(good, tmp_path):
    tensors, metadata = _parts(good)
    bad = tmp_path / "zero.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, str(bad), metadata=metadata)
    with pytest.raises(BundleFormatError, match="every tensor is zero"):
        load_bundle(bad)


def test_loading_a_bundle_leaves_the_global_rng_untouched(good):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    load_bundle(good)
    assert torch.equal(torch.rand(4), expected)


def test_building_a_guard_leaves_the_global_rng_untouched(write_policy):
    path = write_policy()
    torch.manual_seed(5)
    expected = torch.randn(3)
    torch.manual_seed(5)
    SafeRedirGuard.from_policy(path)
    assert torch.equal(torch.randn(3), expected)


@pytest.mark.parametrize(
    "rule, mismatch",
    [
        ({"concept": "nudity", "category": "custom"}, "concept"),
        ({"concept": "red", "category": "nsfw"}, "category"),
    ],
)
def test_a_rule_is_enforced_only_by_a_bundle_of_its_concept_and_category(
    write_policy, bundles, rule, mismatch, recwarn
):
    concepts = [{**rule, "redirector": {"path": str(bundles["red"])}}]  # the bundle: red / custom
    with pytest.raises(GuardBuildError) as info:
        SafeRedirGuard.from_policy(write_policy(concepts))
    assert (
        isinstance(info.value.__cause__, BundleConceptMismatchError)
        and info.value.__cause__.field == mismatch
    )
    guard = SafeRedirGuard.from_policy(write_policy(concepts, fail_mode="open"))
    assert guard.concepts == [] and mismatch in guard.fail_open[0]["reason"]


def test_a_rule_may_not_decide_where_its_bundle_s_classifier_was_never_trained(
    write_policy, bundles, tmp_path, capsys, recwarn
):
    """A bundle whose classifier was fitted at normalised timesteps <= 0.5 only (``saferedir train
    --classify-below``, recorded in its training history; a later fit of the redirection alone keeps
    it): a rule deciding from above would read scores that mean nothing. Closed: no guard; open:
    the concept is not enforced and ``fail_open`` says why."""
    from saferedir_sdk import BundleRuleMismatchError
    from saferedir_sdk.bundle import classified_below
    from saferedir_sdk.cli import main

    tiny = load_bundle(bundles["red"])
    history = {
        "config": {"trainable": "redirection"},
        "init": {"concept": "red", "training_config": {"trainable": "classifier", "classify_below": 0.5}},
    }
    path = tmp_path / "late.safetensors"
    save_bundle(path, tiny.redirector, tiny.concept, tiny.backbone, history)
    assert (classified_below(load_bundle(path)), classified_below(tiny)) == (0.5, 1.0)
    assert main(["bundle", "inspect", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["classify_below"] == 0.5

    def rule(decide_at_t: float) -> list[dict]:
        return [
            {
                "concept": "red",
                "category": "custom",
                "redirector": {"path": str(path)},
                "rewind": True,
                "decide_at_t": decide_at_t,
            }
        ]

    with pytest.raises(
        GuardBuildError, match=r"trained only at normalised timesteps <= 0.5 .* decide_at_t 0.6"
    ):
        SafeRedirGuard.from_policy(write_policy(rule(0.6)))
    guard = SafeRedirGuard.from_policy(write_policy(rule(0.6), fail_mode="open"))
    assert guard.concepts == [] and "decide_at_t 0.6" in guard.fail_open[0]["reason"]
    assert SafeRedirGuard.from_policy(write_policy(rule(0.5))).concepts == ["red"]
    with pytest.raises(GuardBuildError) as info:
        SafeRedirGuard.from_policy(write_policy(rule(1.0)))
    assert isinstance(info.value.__cause__, BundleRuleMismatchError)
    # a history that names no level in (0, 1] is a bad bundle, not "every level"
    for bad in ("half", float("nan"), 0.0, 1.5):
        history["init"]["training_config"]["classify_below"] = bad
        save_bundle(path, tiny.redirector, tiny.concept, tiny.backbone, history)
        with pytest.raises(GuardBuildError) as info:
            SafeRedirGuard.from_policy(write_policy(rule(0.5)))
        assert isinstance(info.value.__cause__, BundleFormatError), bad
        assert "classify_below expected a number in (0, 1]" in str(info.value.__cause__)


# --- fuzzing ---------------------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*prefix, i))


def _replace(value, path, new):
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(value[path[0]], path[1:], new)
    return copy


@settings(max_examples=1200, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    key=st.sampled_from(
        ["saferedir.config", "saferedir.concept", "saferedir.backbone", "saferedir.training"]
    ),
    pick=st.integers(0, 10_000),
    new=JSON_VALUES,
    drop=st.booleans(),
)
def test_fuzzed_metadata_only_ever_raises_bundle_errors(good, tmp_path_factory, key, pick, new, drop):
    tensors, metadata = _parts(good)
    doc = json.loads(metadata[key])
    paths = [p for p in _paths(doc) if p]
    path = paths[pick % len(paths)] if paths else ()
    mutated = _replace(doc, path, new)
    if drop and path:  # delete the key (or list item) instead of replacing it
        mutated = json.loads(json.dumps(doc))
        parent = mutated
        for part in path[:-1]:
            parent = parent[part]
        del parent[path[-1]]
    bad = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    save_file(tensors, str(bad), metadata={**metadata, key: json.dumps(mutated, default=str)})
    _expect_typed(bad)


@settings(max_examples=1000, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)
@given(at=st.integers(0, 2**31), junk=st.binary(min_size=1, max_size=16), mode=st.sampled_from("fidt"))
def test_fuzzed_bytes_only_ever_raise_bundle_errors(good, tmp_path_factory, at, junk, mode):
    raw = good.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0] + 8
    i = at % (header if at % 2 else len(raw))  # half the edits land in the header
    if mode == "f":  # flip: overwrite
        raw = raw[:i] + junk + raw[i + len(junk) :]
    elif mode == "i":
        raw = raw[:i] + junk + raw[i:]
    elif mode == "d":
        raw = raw[:i] + raw[i + len(junk) :]
    else:  # truncate
        raw = raw[:i]
    bad = tmp_path_factory.mktemp("fuzz") / "b.safetensors"
    bad.write_bytes(raw)
    _expect_typed(bad)
