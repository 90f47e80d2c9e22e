"""`evatok encode` / `evatok decode` end to end on real footage: bad inputs, stdin, resume after
SIGKILL, torchrun, batch-size invariance, decoding with metrics, path safety."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

from evatok_cli.cli import app
from evatok_cli.store import open_store
from evatok_cli.video import safe_name

CHECKED_EVATOK = str(Path(__file__).resolve().parents[1] / "checked_evatok.py")  # torchrun entry: NCCL-safe collectives

runner = CliRunner()
EVATOK = [sys.executable, "-m", "evatok_cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _tokens_by_key(path) -> dict[str, tuple]:
    s = open_store(path)
    return {
        x.key: (tuple(x.tokens.tolist()), tuple(int(b) for b in x.block_lengths), x.source, x.clip_start, x.label)
        for x in s
    }


@pytest.fixture(scope="module")
def messy_dir(video_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("messy")
    shutil.copytree(video_dir, d, dirs_exist_ok=True, symlinks=True)
    (d / "talk" / "empty.mp4").write_bytes(b"")
    (d / "talk" / "notes.mp4").write_text("this is not a video\n")
    return d


def test_encode_dir_with_broken_files(messy_dir, tiny_tokenizer, tmp_path):
    out = tmp_path / "t.zarr"
    res = runner.invoke(
        app,
        [
            "encode",
            str(messy_dir),
            "-o",
            str(out),
            "--tokenizer",
            str(tiny_tokenizer),
            "--assignment",
            "fixed:16,4,2,1",
            "--clips",
            "3",
            "--label-from",
            "parent-dir",
            "--workers",
            "0",
            "--json",
            "--quiet",
        ],
    )
    assert res.exit_code == 3, res.output  # finished, some inputs skipped
    summary = json.loads(res.stdout.strip())
    assert summary["clips"] == 6 and summary["failures"] == 2
    assert {Path(f["source"]).name for f in summary["failed"]} == {"empty.mp4", "notes.mp4"}
    assert summary["mean_tokens"] == 23 and summary["uniform_tokens"] == 64
    assert summary["saved_fraction"] == pytest.approx(1 - 23 / 64)
    store = open_store(out)
    assert len(store) == 6 and store.attrs["labels"] == ["ride", "talk"]
    assert sorted({s.label for s in store}) == [0, 1]
    assert {Path(src).name: reason for src, reason in store.failures}.keys() == {"empty.mp4", "notes.mp4"}
    assert all(len(s.tokens) == 23 and tuple(s.block_lengths) == (16, 4, 2, 1) for s in store)
    # rerun of a finished job: nothing to do
    again = runner.invoke(
        app,
        [
            "encode",
            str(messy_dir),
            "-o",
            str(out),
            "--tokenizer",
            str(tiny_tokenizer),
            "--assignment",
            "fixed:16,4,2,1",
            "--clips",
            "3",
            "--label-from",
            "parent-dir",
            "--workers",
            "0",
            "--json",
            "--quiet",
        ],
    )
    s = json.loads(again.stdout.strip())
    assert s["nothing_to_do"] is True and s["failed_before"] == 2 and s["skipped_done"] == 6
    assert again.exit_code == 3  # the broken inputs are still not encoded: never exit 0 having skipped one


def test_no_valid_input_is_a_clear_error(tmp_path, tiny_tokenizer):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "bad.mp4").write_text("nope")
    res = runner.invoke(
        app,
        [
            "encode",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "o.zarr"),
            "--tokenizer",
            str(tiny_tokenizer),
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert res.exit_code == 1 and "no valid input" in res.stderr
    res = runner.invoke(
        app,
        [
            "encode",
            str(tmp_path / "nothing-here"),
            "-o",
            str(tmp_path / "p.zarr"),
            "--tokenizer",
            str(tiny_tokenizer),
            "--quiet",
        ],
    )
    assert res.exit_code == 1 and "nothing-here" in res.stderr
    res = runner.invoke(
        app,
        [
            "encode",
            str(tmp_path / "in"),
            "-o",
            str(tmp_path / "q.zarr"),
            "--tokenizer",
            str(tiny_tokenizer),
            "--strict",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert res.exit_code == 1 and "bad.mp4" in res.stderr


def test_stdin_paths_and_batch_size_invariance(video_dir, tiny_tokenizer, tmp_path):
    cmd = (
        f"find {video_dir} -name '*.mp4' | sort | {' '.join(EVATOK)} encode - -o {tmp_path / 'a.zarr'} "
        f"--tokenizer {tiny_tokenizer} --clips 4 --assignment fixed:8,2,1,16 --batch-size 1 --workers 0 --json --quiet"
    )
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["clips"] == 8
    res = runner.invoke(
        app,
        [
            "encode",
            str(video_dir),
            "-o",
            str(tmp_path / "b.zarr"),
            "--tokenizer",
            str(tiny_tokenizer),
            "--clips",
            "4",
            "--assignment",
            "fixed:8,2,1,16",
            "--batch-size",
            "8",
            "--workers",
            "2",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    a, b = _tokens_by_key(tmp_path / "a.zarr"), _tokens_by_key(tmp_path / "b.zarr")
    assert a.keys() == b.keys() and len(a) == 8
    assert all(a[k][:4] == b[k][:4] for k in a)


def _wait_for_commit(part: Path, proc: subprocess.Popen, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        meta = part / "zarr.json"
        if meta.is_file():
            try:
                n = json.loads(meta.read_text())["attributes"]["committed"]["samples"]
            except (json.JSONDecodeError, KeyError):
                n = 0
            if n > 0:
                return n
        time.sleep(0.05)
    raise AssertionError("the encoder committed nothing before it ended")


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(video_dir, tiny_tokenizer, tmp_path):
    args = [
        "encode",
        str(video_dir),
        "--tokenizer",
        str(tiny_tokenizer),
        "--clips",
        "all",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--quiet",
    ]
    ref = tmp_path / "ref.zarr"
    assert subprocess.run(EVATOK + args + ["-o", str(ref)], env=ENV, timeout=600).returncode == 0
    out = tmp_path / "killed.zarr"
    proc = subprocess.Popen(EVATOK + args + ["-o", str(out)], env=ENV, stderr=subprocess.DEVNULL)
    committed = _wait_for_commit(out / "part-00000", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    total = len(open_store(ref))
    assert 0 < committed < total
    res = subprocess.run(
        EVATOK + args + ["-o", str(out), "--json"], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["skipped_done"] >= committed and summary["skipped_done"] + summary["clips"] == total
    assert _tokens_by_key(out) == _tokens_by_key(ref)
    assert [s.key for s in open_store(out)] == [s.key for s in open_store(ref)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_equals_one_process(video_dir, tiny_tokenizer, tmp_path):
    args = [
        "encode",
        str(video_dir),
        "--tokenizer",
        str(tiny_tokenizer),
        "--clips",
        "3",
        "--workers",
        "0",
        "--quiet",
        "--label-from",
        "parent-dir",
    ]
    one = tmp_path / "one.zarr"
    assert subprocess.run(EVATOK + args + ["-o", str(one)], env=ENV, timeout=300).returncode == 0
    two = tmp_path / "two.zarr"
    cmd = (
        [
            str(Path(sys.executable).with_name("torchrun")),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            CHECKED_EVATOK,
        ]
        + args
        + ["-o", str(two), "--json"]
    )
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["clips"] == 6  # rank 0 reports the whole job
    assert sorted(p.name for p in two.iterdir() if p.name.startswith("part-")) == ["part-00000", "part-00001"]
    assert _tokens_by_key(two) == _tokens_by_key(one)


def test_decode_metrics_match_written_files(video_dir, tiny_tokenizer, tmp_path):
    store = tmp_path / "s.zarr"
    res = runner.invoke(
        app,
        [
            "encode",
            str(video_dir),
            "-o",
            str(store),
            "--tokenizer",
            str(tiny_tokenizer),
            "--clips",
            "2",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        [
            "decode",
            str(store),
            "-o",
            str(tmp_path / "rec"),
            "--tokenizer",
            str(tiny_tokenizer),
            "--metrics",
            "--json",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip())
    assert summary["written"] == 4 and summary["mean_psnr"] is not None
    import torch

    from evatok_cli.metrics import psnr_frames
    from evatok_cli.video import ClipReader, ClipSpec, read_clips
    from evatok_cli.video.dataset import to_model_input

    for rec in summary["per_clip"]:
        written = read_clips(rec["file"], ClipSpec(frames=8, height=32, width=32), "first")[0].frames
        s = open_store(store).get(rec["key"])
        src = ClipReader(s.source, ClipSpec(frames=8, height=32, width=32)).read(s.clip_start).frames
        p = float(
            psnr_frames(
                to_model_input(torch.from_numpy(written)[None]), to_model_input(torch.from_numpy(src)[None])
            ).mean()
        )
        # the mp4 (crf 18, 4:2:0 chroma) adds little error; a random-weight tokenizer's noise-like
        # colours lose most in the chroma subsampling (~0.5 dB here), real reconstructions far less
        assert p == pytest.approx(rec["psnr"], abs=1.0)
    sbs = runner.invoke(
        app,
        [
            "decode",
            str(store),
            "-o",
            str(tmp_path / "sbs"),
            "--tokenizer",
            str(tiny_tokenizer),
            "--limit",
            "1",
            "--side-by-side",
            "--quiet",
        ],
    )
    assert sbs.exit_code == 0
    f = next((tmp_path / "sbs").iterdir())
    info = json.loads(runner.invoke(app, ["info", str(f), "--json"]).stdout)
    assert (info["width"], info["height"], info["frames"]) == (64, 32, 8)


def test_malicious_keys_stay_inside_out_dir(video_dir, tiny_tokenizer, tmp_path):
    store = tmp_path / "evil.zarr"
    res = runner.invoke(
        app,
        [
            "encode",
            str(video_dir),
            "-o",
            str(store),
            "--tokenizer",
            str(tiny_tokenizer),
            "--clips",
            "first",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert res.exit_code == 0
    keys = zarr.open_group(str(store / "part-00000"), mode="r+")["key"]
    keys[:] = np.array(["../../escaped", "/etc/passwd"], dtype=object)
    out = tmp_path / "deep" / "out"
    res = runner.invoke(app, ["decode", str(store), "-o", str(out), "--tokenizer", str(tiny_tokenizer), "--quiet"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["escaped.mp4", "etc_passwd.mp4"]
    assert not (tmp_path / "escaped.mp4").exists() and not list(tmp_path.glob("*.mp4"))
    assert safe_name("..", set()) == "sample" and safe_name("a/b", {"a_b"}) == "a_b_2"


def test_decode_refuses_other_tokenizer(video_dir, tiny_tokenizer, tmp_path):
    import torch

    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config

    store = tmp_path / "s.zarr"
    runner.invoke(
        app,
        [
            "encode",
            str(video_dir),
            "-o",
            str(store),
            "--tokenizer",
            str(tiny_tokenizer),
            "--clips",
            "first",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    torch.manual_seed(1)
    other = EVATokTokenizer(tokenizer_config("tiny")).save_pretrained(tmp_path / "other")
    res = runner.invoke(app, ["decode", str(store), "-o", str(tmp_path / "r"), "--tokenizer", str(other)])
    assert res.exit_code == 1 and "sha256" in res.stderr


@pytest.fixture(scope="module")
def routers(tmp_path_factory):
    """Tiny routers (random weights) for the tiny tokenizer's clips, both heads."""
    import torch

    from evatok_cli.models.router import Router, router_config

    d = tmp_path_factory.mktemp("routers")
    out = {}
    for head in ("classify", "reward"):
        torch.manual_seed(3)
        out[head] = Router(
            router_config("tiny", frames=8, height=32, width=32, levels=(1, 2, 4, 8, 16), blocks=4, head=head)
        ).save_pretrained(d / head, preset="tiny")
    return out


def test_encode_with_router_and_budget(video_dir, tiny_tokenizer, routers, tmp_path):
    from evatok_cli.route import route

    common = ["--tokenizer", str(tiny_tokenizer), "--clips", "4", "--workers", "0", "--quiet", "--json"]
    res = runner.invoke(
        app, ["encode", str(video_dir), "-o", str(tmp_path / "r.zarr"), "--router", str(routers["classify"])] + common
    )
    assert res.exit_code == 0, res.output
    store = open_store(tmp_path / "r.zarr")
    routed = {r["key"]: tuple(r["assignment"]) for r in route(routers["classify"], [str(video_dir)], clips=4).records}
    assert {s.key: tuple(int(x) for x in s.block_lengths) for s in store} == routed  # encode uses the router's choice
    assert store.attrs["assignment_policy"] == {"router": str(routers["classify"])}
    # budget mode: the mean tokens per clip stays within the budget
    res = runner.invoke(
        app,
        ["encode", str(video_dir), "-o", str(tmp_path / "b.zarr"), "--router", str(routers["reward"]), "--budget", "20"]
        + common,
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip())["mean_tokens"] <= 20
    # budget needs a reward head; router and assignment exclude each other
    res = runner.invoke(
        app,
        [
            "encode",
            str(video_dir),
            "-o",
            str(tmp_path / "c.zarr"),
            "--router",
            str(routers["classify"]),
            "--budget",
            "20",
        ]
        + common,
    )
    assert res.exit_code == 1 and "reward" in res.stderr
    res = runner.invoke(
        app,
        [
            "encode",
            str(video_dir),
            "-o",
            str(tmp_path / "d.zarr"),
            "--router",
            str(routers["classify"]),
            "--assignment",
            "uniform:4",
        ]
        + common,
    )
    assert res.exit_code == 1 and "only one of" in res.stderr


def test_store_records_the_assignment_policy(video_dir, tiny_tokenizer, tmp_path):
    for args, want in ((["--assignment", "fixed:16,4,2,1"], {"fixed": [16, 4, 2, 1]}), ([], {"fixed": [16] * 4})):
        out = tmp_path / f"s{len(args)}.zarr"
        res = runner.invoke(
            app,
            [
                "encode",
                str(video_dir),
                "-o",
                str(out),
                "--tokenizer",
                str(tiny_tokenizer),
                "--clips",
                "first",
                "--workers",
                "0",
                "--quiet",
            ]
            + args,
        )
        assert res.exit_code == 0, res.output
        assert open_store(out).attrs["assignment_policy"] == want
