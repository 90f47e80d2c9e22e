"""`evatok info` on real videos, on stores, and on bad paths: CliRunner and a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.cli import app
from evatok_cli.store import Sample, open_writer

runner = CliRunner()

ATTRS = dict(
    tokenizer={"config": {"preset": "test"}, "sha256": "0" * 64},
    space={"levels": [1, 2, 4, 8, 16], "blocks": 4},
    clip={"frames": 8, "height": 32, "width": 32, "fps": "native"},
    codebook_size=1024,
)


@pytest.fixture
def store(tmp_path):
    space = AssignmentSpace((1, 2, 4, 8, 16), 4)
    rng = np.random.default_rng(0)
    path = tmp_path / "toks.zarr"
    picks = [space.to_index((16, 8, 2, 1))] * 3 + [space.to_index((4, 4, 4, 4))] * 2 + [0]
    with open_writer(path, attrs=ATTRS, num_blocks=4) as w:
        w.append(
            [
                Sample(
                    key=f"clip{i}",
                    tokens=rng.integers(0, 1024, space.length(a)),
                    block_lengths=space.to_tuple(a),
                    assignment=a,
                    source=f"/data/v{i}.mp4",
                    clip_start=0,
                )
                for i, a in enumerate(picks)
            ]
        )
    return path


def test_info_video_json(footage):
    res = runner.invoke(app, ["info", str(footage["bikes"]), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout.strip())
    assert rec["type"] == "video" and rec["width"] == 640 and rec["height"] == 272
    assert rec["frames"] == 250 and rec["fps"] == pytest.approx(25.0) and rec["codec"] == "h264"


def test_info_store_json_and_table(store):
    res = runner.invoke(app, ["info", str(store), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout.strip())
    assert rec["type"] == "store" and rec["samples"] == 6
    lengths = [27] * 3 + [16] * 2 + [4]
    assert rec["total_tokens"] == sum(lengths)
    assert rec["mean_tokens"] == pytest.approx(np.mean(lengths))
    assert rec["min_tokens"] == 4 and rec["max_tokens"] == 27
    top = rec["top_assignments"]
    assert tuple(top[0][0]) == (16, 8, 2, 1) and top[0][1] == 3
    human = runner.invoke(app, ["info", str(store)])
    assert human.exit_code == 0 and "samples" in human.stdout and "(16, 8, 2, 1)" in human.stdout


def test_info_bad_paths_one_line_errors(tmp_path, footage):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    res = runner.invoke(app, ["info", str(tmp_path / "missing.mp4")])
    assert res.exit_code == 1
    assert "missing.mp4" in res.stderr and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["info", str(footage["carphone"]), str(text), "--json"])
    assert res.exit_code == 1  # one of two failed: the good one is still reported
    assert json.loads(res.stdout.strip())["width"] == 176
    assert "notes.mp4" in res.stderr


def test_info_unfinished_store_says_so(tmp_path):
    path = tmp_path / "half.zarr"
    w = open_writer(path, attrs=ATTRS, num_blocks=4, rank=0, world_size=2)
    w.close()  # rank 1 never ran
    res = runner.invoke(app, ["info", str(path)])
    assert res.exit_code == 1 and "unfinished" in res.stderr


def test_info_real_subprocess(store, footage):
    out = subprocess.run(
        [sys.executable, "-m", "evatok_cli", "info", "--json", str(footage["carphone"]), str(store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    recs = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["type"] for r in recs] == ["video", "store"]
    assert recs[0]["frames"] == 120 and recs[1]["samples"] == 6


def test_info_piped_writes_plain_lines(store):
    """Not a terminal: `key: value` lines, nothing wrapped at 20 characters (a real pipe)."""
    out = subprocess.run(
        [sys.executable, "-m", "evatok_cli", "info", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "20"},
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"{store} (store)"
    assert "  samples: 6" in lines and "  min_tokens: 4" in lines
    assert not any(c in out.stdout for c in "┏━│┃")  # no table
    assert "  metadata: tokenizer: preset ?, weights sha256 000000000000" in lines  # whole, not wrapped
    assert "    space: levels [1, 2, 4, 8, 16], blocks 4" in lines
    models = subprocess.run(
        [sys.executable, "-m", "evatok_cli", "info", "--models"], capture_output=True, text=True, timeout=120
    )
    assert models.returncode == 0 and any(
        x.startswith("  sha256: ") and len(x) == 10 + 64 for x in models.stdout.splitlines()
    )
