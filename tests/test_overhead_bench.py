"""benchmarks/overhead.py runs end to end (at the tiny pipeline's size: the SD 1.5-scale figures are
the README's, from the command it names) and its kernel counts say what issue #15 needs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def overhead(tmp_path_factory):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import overhead
    finally:
        sys.path.remove(str(BENCHMARKS))
    out = tmp_path_factory.mktemp("overhead")
    overhead.main(
        [
            "--scale",
            "tiny",
            "--rounds",
            "1",
            "--reps",
            "2",
            "--configs",
            "guard 3 triggered, every step",
            "--out",
            str(out),
        ]
    )
    return json.loads((out / "overhead.json").read_text()), (out / "overhead.md").read_text()


def test_kernels_per_checked_step_are_flat_in_the_number_of_concepts(overhead):
    km = overhead[0]["kernels_memory"]
    batched = {n: km[n]["kernels_batched_step"] for n in ("3", "10", "30")}
    assert len(set(batched.values())) == 1, batched
    loop = {n: km[n]["kernels_loop_of_forwards"] for n in ("1", "3", "10", "30")}
    assert loop["30"] == 30 * loop["1"] and batched["30"] < loop["3"], (loop, batched)


def test_every_table_is_filled(overhead):
    result, table = overhead
    e2e = result["end_to_end"]
    assert set(e2e) == {
        "unguarded",
        "negative prompt",
        "safe latent diffusion",
        "guard 3 triggered, every step",
    }
    assert all(r["median"] > 0 and r["n"] == 1 for r in e2e.values())
    parts = result["hook_parts"]["guard 3 triggered, every step"]
    assert (
        parts["latent_encoder_ms"] > 0
        and parts["token_heads_ms"] > 0
        and parts["per_call_outside_loop_ms"] > 0
    )
    km = result["kernels_memory"]
    assert km["bundle_file_bytes"] > 0 and km["3"]["step_peak_bytes"] > km["1"]["step_peak_bytes"] > 0
    assert "| safe latent diffusion |" in table and "kernels/checked step" in table and "step ratio" in table


def test_probe_scores_prints_every_check_of_every_prompt(capsys, monkeypatch):
    """benchmarks/probe_scores.py (the README's long-prompt probe): one line per check and prompt.
    The red bundle's classifier reads the latent alone: at the first check (pure noise) it cannot
    tell the red circle from the blue square; once the image forms it can, and stays sure."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import probe_scores
    finally:
        sys.path.remove(str(BENCHMARKS))
    prompts = ["a red circle", "a blue square"]
    monkeypatch.setattr(
        sys, "argv", ["probe_scores.py", "--bundle", "red", "--words", "red", "--threads", "1", *prompts]
    )
    probe_scores.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == prompts[0] and lines[11] == prompts[1] and len(lines) == 22
    p = [float(line.split("p=")[1].split()[0]) for line in lines if "p=" in line]
    red, blue = p[:10], p[10:]
    assert "mask[red]=" in lines[1] and "mask[" not in lines[12]
    assert abs(red[0] - blue[0]) < 0.2, (red, blue)  # step 0: the words do not move it
    assert min(red[2:]) >= 0.9 and max(blue[2:]) < 0.1, (red, blue)


def test_judge_map_reads_the_palette_hues_as_themselves(capsys, monkeypatch):
    """benchmarks/judge_map.py (the judge's reading of hues off its palette): a row per
    saturation/value level, a cell per hue; vivid red (hue 0) reads red, vivid blue (240) blue, and
    ``--rgb`` prints every colour's probability for each colour given; a malformed one is refused."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import judge_map
    finally:
        sys.path.remove(str(BENCHMARKS))
    monkeypatch.setattr(
        sys, "argv", ["judge_map.py", "--step", "120", "--rgb", "215,35,35", "--threads", "1"]
    )
    judge_map.main()
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| 1.0,0.85 |")]
    assert rows == ["| 1.0,0.85 | re | gr | bl |"], rows
    assert len([line for line in lines if line.startswith("| 0.")]) == len(judge_map.LEVELS) - 1
    (reading,) = [line for line in lines if line.startswith("(215, 35, 35): red ")]
    assert len(reading.split(", ")) == 6 + 2  # six colours (the rgb tuple holds two more commas)
    with pytest.raises(SystemExit):
        monkeypatch.setattr(sys, "argv", ["judge_map.py", "--rgb", "300,0,0"])
        judge_map.main()


def test_classifier_area_reads_the_palette_red_and_its_neighbours_apart(capsys, monkeypatch):
    """benchmarks/classifier_area.py (red's latent classifier beside the judge on clean renders of a
    colour, by shape and texture): a row per colour with a judge / classifier cell per shape and
    texture; the palette's red reads red to both in every cell, its orange and purple to neither."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import classifier_area
    finally:
        sys.path.remove(str(BENCHMARKS))
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "classifier_area.py",
            "--rgb",
            "215,35,35",
            "245,130,20",
            "135,45,175",
            "--renders",
            "2",
            "--threads",
            "1",
        ],
    )
    classifier_area.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line[2:3].isdigit()]
    assert len(rows) == 3, rows
    cells = [[tuple(map(float, c.split(" / "))) for c in row.strip("| ").split(" | ")[1:]] for row in rows]
    assert all(len(row) == 8 for row in cells)
    assert all(j > 0.9 and c > 0.9 for j, c in cells[0]), cells[0]
    assert all(j < 0.1 and c < 0.1 for row in cells[1:] for j, c in row), cells[1:]
