"""The diffusers transparency harness (benchmarks/) reports what differs: its comparison and digest
are checked here, so a clean report means the runs matched, not that nothing was compared."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from diffusers_transparency import compare  # noqa: E402
from transparency_plugin import digest  # noqa: E402


def _rows(outcome="passed", value="d1", records=1, guarded=1):
    return [
        {"kind": "call", "test": "t::a", "index": 0, "class": "P", "wrapped": guarded > 0, "digest": value},
        {"kind": "outcome", "test": "t::a", "outcome": outcome},
        {"kind": "audit", "test": "t::a", "guarded_calls": guarded, "records": records},
    ]


def test_compare_names_every_kind_of_difference():
    same = compare(_rows(guarded=0), _rows())
    assert same["differing_outcomes"] == [] and same["differing_digests"] == [] and same["guarded_calls"] == 1
    other = compare(_rows(guarded=0), _rows(outcome="failed", value="d2", records=2))
    assert other["differing_outcomes"] == ["t::a: passed -> failed"]
    assert other["differing_digests"] == ["t::a call 0: d1 -> d2"]
    assert other["tests_where_records_differ_from_guarded_calls"] == ["t::a: 1 calls, 2 records"]


def test_digest_sees_one_changed_value_in_any_output_type():
    image = np.zeros((1, 8, 8, 3), dtype=np.float32)
    changed = image.copy()
    changed[0, 3, 3, 1] = 1e-7
    assert digest({"images": image}) != digest({"images": changed})
    assert digest((torch.zeros(2, 4),)) != digest((torch.zeros(2, 4, dtype=torch.float64),))
    assert digest([image, None]) == digest([image.copy(), None])
