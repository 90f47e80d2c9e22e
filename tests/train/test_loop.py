"""The shared training loop: checkpoints, exact resume, keep-last-k, and DDP under real torchrun."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evatok_cli.train import checkpoints as ckpt
from evatok_cli.train import loop
from evatok_cli.train.dist import DistEnv
from evatok_cli.train.schedule import warmup_cosine, wsd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import toy  # noqa: E402


def _train(out, steps, every, resume=False):
    env = DistEnv()
    task = toy.ToyTask(env, 12)
    final = loop.run(
        task,
        toy.batches(0),
        cfg=loop.LoopConfig(steps=steps, checkpoint_every=every, log_every=1, keep_last=2),
        out=out,
        env=env,
        resume=resume,
    )
    return task, final


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_equals_uninterrupted(tmp_path):
    full, _ = _train(tmp_path / "full", 12, 6)
    _train(tmp_path / "half", 6, 6)
    with pytest.raises(loop.ResumeError, match="--resume"):
        _train(tmp_path / "half", 12, 6)
    resumed, final = _train(tmp_path / "half", 12, 6, resume=True)
    for a, b in zip(full.raw.parameters(), resumed.raw.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert _losses(tmp_path / "full") == pytest.approx(_losses(tmp_path / "half"), abs=0)
    assert final.name == "step-00000011"
    # the saved directory is a loadable model dir; EMA weights differ from raw weights
    from evatok_cli.checkpoint import load_model

    ema = load_model(ckpt.resolve_model_dir(tmp_path / "half"), kind="toy")
    raw = load_model(final, kind="toy", ema=False)
    assert not torch.equal(ema.net[0].weight, raw.net[0].weight)


def test_keep_last_and_incomplete_ignored(tmp_path):
    _train(tmp_path, 12, 2)
    assert [s for s, _ in ckpt.valid_steps(tmp_path)] == [9, 11]
    # a crash mid-save leaves a directory without state.json: it is ignored and removed
    broken = ckpt.step_dir(tmp_path, 13)
    broken.mkdir()
    assert ckpt.latest_step_dir(tmp_path).name == "step-00000011"
    _, final = _train(tmp_path, 12, 2, resume=True)  # nothing to do
    assert final.name == "step-00000011"


def test_schedules():
    assert warmup_cosine(0, total=100, warmup=10, max_lr=1e-4, min_lr=1e-6) == pytest.approx(1e-5)
    assert warmup_cosine(10, total=100, warmup=10, max_lr=1e-4, min_lr=1e-6) == pytest.approx(1e-4)
    assert warmup_cosine(100, total=100, warmup=10, max_lr=1e-4, min_lr=1e-6) == pytest.approx(1e-6)
    assert wsd(79, total=100, max_lr=1.0) == 1.0
    assert wsd(90, total=100, max_lr=1.0) == pytest.approx(0.5)
    assert wsd(100, total=100, max_lr=1.0) == 0.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_ddp_keeps_ranks_in_sync(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(HERE / "toy.py"),
        "--out",
        str(tmp_path / "ddp"),
        "--steps",
        "4",
        "--every",
        "2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    recs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in recs) == [0, 1]
    assert recs[0]["weights"] == recs[1]["weights"]
    assert (tmp_path / "ddp" / "step-00000003" / "rng-rank1.pt").is_file()
