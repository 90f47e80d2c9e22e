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
