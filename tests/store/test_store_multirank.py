"""Multi-rank writing under real torchrun (gloo, CPU): one part per rank, one index, resume."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_job import failing_source, make_sample

from evatok_cli.store import StoreError, is_store, open_store

JOB = Path(__file__).with_name("store_job.py")
N = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, fmt: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(JOB), str(out), "--dist", "--format", fmt, "--samples", str(N), *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def expected_keys(world: int) -> list[str]:
    return [make_sample(i).key for r in range(world) for i in range(r, N, world) if not failing_source(i)]


def check(out: Path) -> None:
    r = open_store(out)  # no world size needed
    assert r.keys == expected_keys(2) and len(set(r.keys)) == len(r.keys)
    for s in r:
        i = int(s.key[4:9])
        np.testing.assert_array_equal(s.tokens, make_sample(i).tokens)
    assert sorted(src for src, _ in r.failures) == sorted(str(i) for i in range(N) if failing_source(i))


@pytest.mark.slow
def test_two_ranks_write_one_store(tmp_path):
    res = torchrun(tmp_path / "out", "zarr,wds")  # one launch writes out.zarr, then out.wds
    assert res.returncode == 0, res.stderr[-3000:]
    for fmt in ("zarr", "wds"):
        assert f"done rank 0 {fmt} finished=True" in res.stdout  # rank 0 wrote the index
        check(tmp_path / f"out.{fmt}")


@pytest.mark.slow
def test_rank_killed_then_rerun(tmp_path):
    out = tmp_path / "out.zarr"
    res = torchrun(out, "zarr", "--kill-rank", "1", "--kill-after", "8", "--sleep", "0.02")
    assert res.returncode != 0
    assert not is_store(out)
    with pytest.raises(StoreError, match=r"unfinished: [01] of 2 parts complete"):
        open_store(out)
    res = torchrun(out, "zarr")
    assert res.returncode == 0, res.stderr[-3000:]
    check(out)


@pytest.mark.slow
def test_ranks_of_one_job_share_the_lock_a_second_job_is_refused(tmp_path):
    """Both ranks of job A write (one lock, held for the torchrun agent); job B on the same store,
    launched while A runs, is refused at once and changes nothing; A finishes with exactly its data."""
    from evatok_cli.store.lock import read_lock

    out = tmp_path / "out.zarr"

    def launch(*extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(JOB), str(out), "--dist", "--format", "zarr", "--samples",
               str(N), *extra]  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    a = launch("--sleep", "1.5")  # about 12 s of writing: job B starts well within it
    assert a.stdout is not None
    for line in a.stdout:  # wait until job A has committed something
        if line.startswith("committed"):
            break
    rec = read_lock(out)
    assert rec is not None and rec["pid"] == a.pid and rec["job"].startswith("torchrun:")
    b = launch()
    _, err_b = b.communicate(timeout=120)
    assert b.returncode != 0 and f"is being written by another process (pid {a.pid}" in err_b
    _, err_a = a.communicate(timeout=120)
    assert a.returncode == 0, err_a[-3000:]
    check(out)
    assert read_lock(out) is None
