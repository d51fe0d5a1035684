"""``saferedir policy pin`` (issue #12, item 3): every rule's bundle pinned by sha256, comments and
layout kept; a pinned bundle changed by one byte is then refused."""

from __future__ import annotations

import pytest

from saferedir_sdk import GuardBuildError, SafeRedirGuard
from saferedir_sdk.cli import main
from saferedir_sdk.policy import load_policy


def test_pin_writes_the_hashes_in_place_and_keeps_comments(tmp_path, bundles, capsys):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "# keep me\nversion: 1\nname: t\naudit: {sinks: [file], file: " + str(tmp_path / "a.jsonl") + "}\n"
        "concepts:\n"
        f"  - concept: red\n    category: custom\n    redirector: {{path: {bundles['red']}}}  # flow\n"
        f"  - concept: star\n    category: custom\n    redirector:\n      path: {bundles['star']}  # block\n"
    )
    assert main(["policy", "pin", str(policy)]) == 0
    text = policy.read_text()
    assert "# keep me" in text and "# flow" in text and "# block" in text
    rules = load_policy(policy).policy.concepts
    assert all(r.redirector.sha256 and len(r.redirector.sha256) == 64 for r in rules)
    assert main(["policy", "pin", str(policy)]) == 0 and "nothing to pin" in capsys.readouterr().out
    SafeRedirGuard.from_policy(policy)  # the pins match
    raw = bytearray(bundles["red"].read_bytes())
    copy = tmp_path / "red.safetensors"
    raw[-1] ^= 1  # one byte of tensor data
    copy.write_bytes(bytes(raw))
    policy.write_text(text.replace(str(bundles["red"]), str(copy)))
    with pytest.raises(GuardBuildError, match="sha256 mismatch"):
        SafeRedirGuard.from_policy(policy)
    assert main(["policy", "pin", str(policy)]) == 1, (
        "a pin that no longer matches is an error, not re-pinned"
    )
