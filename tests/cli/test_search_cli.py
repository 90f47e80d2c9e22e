"""`evatok search` through the Typer app: the exact library call, usage errors, and a real run on a
directory of two real videos plus a broken file (exit code 3, failure recorded, labels readable)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evatok_cli.assignments import AssignmentSpace, label_spread
from evatok_cli.cli import app
from evatok_cli.reward import rewards
from evatok_cli.search import SearchSummary
from evatok_cli.store import open_store

runner = CliRunner()


@pytest.fixture(scope="module")
def mixed_dir(footage, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mixed")
    (d / "bikes.mp4").symlink_to(footage["bikes"])
    (d / "carphone.mp4").symlink_to(footage["carphone"])
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 200)
    return d


def test_cli_calls_search_dataset_with_exact_kwargs(monkeypatch, tmp_path):
    calls = []

    def fake(tokenizer, data, out, **kw):
        calls.append((tokenizer, data, out, kw))
        return SearchSummary(
            out=str(out),
            format=kw["format"],
            clips=3,
            calibration={"metric": "ssim", "mean": 0.5, "std": 0.1, "count": 7, "seed": 4},
        )

    monkeypatch.setattr("evatok_cli.search.search_dataset", fake)
    res = runner.invoke(
        app,
        [
            "search",
            "--tokenizer",
            "p",
            "--data",
            "a",
            "--data",
            "b",
            "-o",
            "o.zarr",
            "--format",
            "wds",
            "--metric",
            "ssim",
            "--w-q",
            "1.4",
            "--w-l",
            "0.6",
            "--calibration",
            "7",
            "--beam",
            "5",
            "--clips",
            "3",
            "--fps",
            "3",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--chunk",
            "50",
            "--seed",
            "4",
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["clips"] == 3
    ((tokenizer, data, out, kw),) = calls
    assert (tokenizer, data, out) == (Path("p"), ["a", "b"], Path("o.zarr"))
    on_progress = kw.pop("on_progress")
    assert on_progress is None  # --quiet
    assert kw == dict(
        format="wds",
        metric="ssim",
        metric_options=None,
        w_q=1.4,
        w_l=0.6,
        calibration=7,
        stats=None,
        beam=5,
        clips=3,
        fps="3",
        batch_size=4,
        workers=0,
        chunk=50,
        seed=4,
        device="cpu",
        stdin=None,
    )
    # LPIPS weights travel as metric options
    runner.invoke(
        app,
        [
            "search",
            "--tokenizer",
            "p",
            "--data",
            "a",
            "-o",
            "o",
            "--metric",
            "lpips",
            "--lpips-net",
            "alex",
            "--lpips-backbone",
            "alex.pth",
            "--stats",
            "s.json",
        ],
    )
    assert calls[-1][3]["metric_options"] == {"net": "alex", "backbone": Path("alex.pth"), "heads": None}
    assert calls[-1][3]["stats"] == Path("s.json") and calls[-1][3]["clips"] == "first"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--clips", "some"], "--clips"),
        (["--metric", "mse"], "--metric"),
        (["--metric", "lpips"], "--lpips-backbone"),
        (["--format", "tar"], "--format"),
        (["--beam", "0"], "--beam"),
        (["--calibration", "1"], "--calibration"),
    ],
)
def test_usage_errors_exit_2(args, message, monkeypatch):
    monkeypatch.setattr("evatok_cli.search.search_dataset", lambda *a, **k: pytest.fail("library called"))
    res = runner.invoke(app, ["search", "--tokenizer", "p", "--data", "a", "-o", "o", *args])
    assert res.exit_code == 2 and message in res.stderr


def test_missing_tokenizer_is_fatal(tmp_path, mixed_dir):
    res = runner.invoke(
        app,
        [
            "search",
            "--tokenizer",
            str(tmp_path / "none"),
            "--data",
            str(mixed_dir),
            "-o",
            str(tmp_path / "o.zarr"),
            "--quiet",
        ],
    )
    assert res.exit_code == 1 and "none" in res.stderr


def test_search_directory_with_broken_file(tiny_tokenizer, mixed_dir, tmp_path):
    out = tmp_path / "labels.zarr"
    args = [
        "search",
        "--tokenizer",
        str(tiny_tokenizer),
        "--data",
        str(mixed_dir),
        "-o",
        str(out),
        "--calibration",
        "8",
        "--workers",
        "0",
        "--device",
        "cpu",
    ]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 3, res.output  # finished, one input skipped
    summary = json.loads(res.stdout)
    assert summary["clips"] == 2 and summary["failures"] == 1 and summary["block_evals_per_clip"] == 780
    assert Path(summary["failed"][0]["source"]).name == "broken.mp4"
    assert "mean best tokens" in res.stderr and "780 block evaluations per clip" in res.stderr

    store = open_store(out)
    assert len(store) == 2 and [Path(s).name for s, _ in store.failures] == ["broken.mp4"]
    space = AssignmentSpace.from_dict(store.attrs["space"])
    search = store.attrs["search"]
    assert store.attrs["kind"] == "labels" and search["beam"] is None and search["calibration"]["seed"] == 0
    assert store.attrs["tokenizer"]["sha256"] and store.attrs["clip"]["frames"] == 8
    for s in store:
        assert s.extra["metric"].shape == (625,) and s.label == -1
        r = rewards(s.extra["metric"], search["calibration"], space, search["w_q"], search["w_l"], True)
        assert int(np.argmax(r)) == s.assignment and len(s.tokens) == sum(space.to_tuple(s.assignment))

    info = runner.invoke(app, ["info", str(out), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["samples"] == 2

    again = runner.invoke(app, [*args, "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["nothing_to_do"] is True and "nothing to do" in again.stderr

    # the labels store itself as --stats: same calibration, same labels, on one of the videos
    one = tmp_path / "one.zarr"
    res = runner.invoke(
        app,
        [
            "search",
            "--tokenizer",
            str(tiny_tokenizer),
            "--data",
            str(mixed_dir / "bikes.mp4"),
            "-o",
            str(one),
            "--stats",
            str(out),
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    got = open_store(one)
    assert got.attrs["search"]["calibration"] == search["calibration"]
    assert got[0].assignment == store.get(got[0].key).assignment

    # a different reward into the same store is refused
    res = runner.invoke(app, [*args, "--w-q", "1.0", "--quiet"])
    assert res.exit_code == 1 and "different" in res.stderr


def test_collapsed_labels_are_reported_with_a_suggestion(tiny_tokenizer, footage, tmp_path):
    """A length weight that swamps the quality term puts every clip on the shortest assignment: the
    search still finishes, and says so on stderr and in its JSON (issue: the router then learns a
    constant and route --eval reports 100% everywhere, which nothing used to flag)."""
    out = tmp_path / "labels.zarr"
    res = runner.invoke(
        app,
        [
            "search",
            "--tokenizer",
            str(tiny_tokenizer),
            "--data",
            str(footage["bikes"]),
            "--data",
            str(footage["carphone"]),
            "--clips",
            "4",
            "-o",
            str(out),
            "--calibration",
            "8",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--w-l",
            "100",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    spread = json.loads(res.stdout)["spread"]
    assert spread["clips"] == 8 and spread["shortest_share"] == 1.0 and spread["distinct"] == 1
    assert spread["collapsed"] is True and "lower --w-l" in spread["suggestion"]
    assert "the labels collapsed: 100% of the clips got the shortest assignment" in res.stderr


def test_label_spread_rules():
    space = AssignmentSpace(levels=(1, 2, 4), blocks=2)
    spread = label_spread(space, np.arange(9))  # every assignment once
    assert (
        spread["distinct"] == 9
        and not spread["collapsed"]
        and spread["entropy_bits"] == pytest.approx(np.log2(9), abs=1e-3)
    )
    longest = label_spread(space, [8] * 6 + [0, 1, 2, 3])
    assert longest["collapsed"] and longest["longest_share"] == 0.6 and "raise --w-l" in longest["suggestion"]
    middle = label_spread(space, [4] * 5 + [0, 1, 2, 3, 8])
    assert middle["collapsed"] and middle["top"] == {"assignment": [2, 2], "share": 0.5}
    assert not label_spread(space, [0] * 7)["collapsed"]  # too few clips to judge


def test_search_store_is_locked_and_more_inputs_append(tiny_tokenizer, mixed_dir, tmp_path):
    import os
    import subprocess
    import sys

    from evatok_cli.store.lock import LOCK_NAME

    out = tmp_path / "labels.zarr"
    args = [
        "search",
        "--tokenizer",
        str(tiny_tokenizer),
        "-o",
        str(out),
        "--calibration",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--quiet",
    ]
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # another live process holds the store: refused at once, nothing written
        (out / LOCK_NAME).write_text(
            json.dumps({"pid": holder.pid, "host": os.uname().nodename, "job": "other", "command": "evatok search"})
        )
        res = runner.invoke(app, [*args, "--data", str(mixed_dir / "bikes.mp4")])
        assert res.exit_code == 1 and f"pid {holder.pid}" in res.stderr and "being written" in res.stderr
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    res = runner.invoke(app, [*args, "--data", str(mixed_dir / "bikes.mp4")])  # the dead holder's lock: taken over
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, [*args, "--data", str(mixed_dir / "bikes.mp4"), "--data", str(mixed_dir / "carphone.mp4"), "--json"]
    )
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert not s["nothing_to_do"] and s["clips"] == 1 and s["resumed"] == 1
    assert sorted(Path(x.source).name for x in open_store(out)) == ["bikes.mp4", "carphone.mp4"]
