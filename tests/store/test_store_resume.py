"""Resume after a kill, unfinished and finished stores, mismatched attrs, bad paths."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from store_job import EXTRA, make_attrs, make_sample

from evatok_cli.store import StoreError, finalize, is_store, open_store, open_writer

FORMATS = ["zarr", "wds"]
JOB = Path(__file__).with_name("store_job.py")


def opener(path, fmt, **kw):
    kw = dict(commit_every=4, samples_per_shard=4, **kw)
    return open_writer(path, format=fmt, attrs=make_attrs(), num_blocks=4, extra_fields=EXTRA, **kw)


def snapshot(path) -> list[tuple]:
    r = open_store(path)
    return [
        (
            s.key,
            s.tokens.tobytes(),
            tuple(s.block_lengths),
            s.assignment,
            s.source,
            s.clip_start,
            s.label,
            s.extra["metric"].tobytes(),
            float(s.extra["reward"]),
        )
        for s in r
    ], r.failures


def run_job(out, fmt, *extra) -> subprocess.Popen:
    cmd = [sys.executable, str(JOB), str(out), "--format", fmt, "--samples", "150", "--batch", "3", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path, fmt):
    ref = run_job(tmp_path / "ref", fmt)
    # Kill twice at whatever instant the job is at after a few commits, then let it finish.
    for kill_at in (20, 60):
        p = run_job(tmp_path / "out", fmt, "--sleep", "0.01")
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("committed") and int(line.split()[1]) >= kill_at:
                p.send_signal(signal.SIGKILL)
                break
        assert p.wait(timeout=60) == -signal.SIGKILL, p.stderr.read() if p.stderr else ""
        assert not is_store(tmp_path / "out")
        with pytest.raises(StoreError, match="unfinished: 0 of 1 parts complete; rerun the same command"):
            open_store(tmp_path / "out")
        partial = open_store(tmp_path / "out", allow_unfinished=True)
        assert len(partial) >= kill_at
    out, err = run_job(tmp_path / "out", fmt).communicate(timeout=60)
    assert f"done rank 0 {fmt} finished=True" in out, err
    assert ref.wait(timeout=60) == 0, ref.stderr.read() if ref.stderr else ""
    got, want = snapshot(tmp_path / "out"), snapshot(tmp_path / "ref")
    assert len(got[0]) == 146 and len({s[0] for s in got[0]}) == 146  # 150 minus 4 failing sources
    assert got == want
    # Nothing left behind by the killed runs.
    junk = [p.name for p in (tmp_path / "out").rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert junk == []
    # The same command once more: nothing to do.
    out, _ = run_job(tmp_path / "out", fmt).communicate(timeout=60)
    assert "nothing to do" in out


def test_zarr_commit_interrupted_after_data_before_counts(tmp_path, monkeypatch):
    """Rows written beyond the committed end by a killed commit are dropped on reopen."""
    path = tmp_path / "s.zarr"
    samples = [make_sample(i) for i in range(12)]
    w = opener(path, "zarr")
    w.append(samples[:8])  # two commits
    part = w.part

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands in for SIGKILL between the data and the counts

    monkeypatch.setattr(type(part.attrs), "update", killed)
    with pytest.raises(KeyboardInterrupt):
        w.append(samples[8:12])
    monkeypatch.undo()
    assert part["key"].shape[0] == 12  # the rows are on disk ...

    w2 = opener(path, "zarr")  # ... and dropped on reopen
    assert w2.committed == 8 and w2.done_keys == {s.key for s in samples[:8]}
    assert w2.part["key"].shape[0] == 8 and w2.part["tokens"].shape[0] == sum(len(s.tokens) for s in samples[:8])
    w2.append(samples[8:])
    w2.close()
    assert open_store(path).keys == [s.key for s in samples]


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_in_process(tmp_path, fmt):
    samples = [make_sample(i) for i in range(10)]
    w = opener(tmp_path / "s", fmt)
    w.append(samples[:6])  # 4 committed, 2 buffered
    w.add_failure("a.mp4", "broken")
    w.abort()  # like a kill: the buffer is lost
    w = opener(tmp_path / "s", fmt)
    assert w.done_keys == {s.key for s in samples[:4]} and w.committed == 4
    with pytest.raises(StoreError, match="committed by an earlier run"):
        w.append(samples[:1])
    w.append(samples[4:])
    w.add_failure("b.mp4", "broken")
    w.close()
    r = open_store(tmp_path / "s")
    assert r.keys == [s.key for s in samples] and r.failures == [("b.mp4", "broken")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_finished_store_reopened(tmp_path, fmt):
    with opener(tmp_path / "s", fmt) as w:
        w.append([make_sample(i) for i in range(5)])
    w = opener(tmp_path / "s", fmt, rank=1, world_size=3)  # the world size of a finished store is moot
    assert w.finished and w.done_keys == {make_sample(i).key for i in range(5)}
    with pytest.raises(StoreError, match="is finished"):
        w.append([make_sample(7)])
    w.close()
    assert len(open_store(tmp_path / "s")) == 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_mismatches_are_refused(tmp_path, fmt):
    path = tmp_path / "s"
    opener(path, fmt, world_size=2).abort()
    other = make_attrs()
    other["tokenizer"]["sha256"] = "1" * 64
    with pytest.raises(StoreError, match=r"different attrs \(differs in tokenizer\)"):
        open_writer(path, format=fmt, attrs=other, num_blocks=4, extra_fields=EXTRA)
    with pytest.raises(StoreError, match="different layout"):
        open_writer(path, format=fmt, attrs=make_attrs(), num_blocks=4, world_size=2)
    with pytest.raises(StoreError, match="world_size=2, this run has 1"):
        opener(path, fmt)
    with pytest.raises(StoreError, match=f"is a {fmt} store"):
        opener(path, "wds" if fmt == "zarr" else "zarr")


def test_paths_that_are_not_stores(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.txt").write_text("hi")
    (tmp_path / "f.mp4").write_bytes(b"0")
    for p in ("dir", "f.mp4", "missing"):
        assert not is_store(tmp_path / p)
        with pytest.raises(StoreError, match=str(tmp_path / p)):
            open_store(tmp_path / p)
    with pytest.raises(StoreError, match="not an evatok token store"):
        opener(tmp_path / "dir", "zarr")
    with pytest.raises(StoreError, match="not an evatok token store"):
        finalize(tmp_path / "dir")


def test_corrupted_indexes(tmp_path):
    with opener(tmp_path / "w", "wds") as w:
        w.append([make_sample(0)])
    (tmp_path / "w" / "index.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupted index"):
        open_store(tmp_path / "w")
    with opener(tmp_path / "z", "zarr") as w:
        w.append([make_sample(0)])
    meta = json.loads((tmp_path / "z" / "zarr.json").read_text())
    meta["attributes"]["index"]["parts"][0]["tokens"] += 1
    (tmp_path / "z" / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="does not match the index"):
        open_store(tmp_path / "z")
    (tmp_path / "z" / "zarr.json").write_text("garbage")
    with pytest.raises(StoreError, match="corrupted zarr.json"):
        open_store(tmp_path / "z")


@pytest.mark.parametrize("fmt", FORMATS)
def test_ranks_without_barrier(tmp_path, fmt):
    """Ranks in any order; the last to complete writes the index; finalize() is idempotent."""
    samples = [make_sample(i) for i in range(9)]
    w1 = opener(tmp_path / "s", fmt, rank=1, world_size=2)
    w0 = opener(tmp_path / "s", fmt, rank=0, world_size=2)
    w1.append(samples[5:])
    w1.close()
    assert not w1.finished
    with pytest.raises(StoreError, match="1 of 2 parts complete"):
        open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="unfinished"):
        finalize(tmp_path / "s")
    w0.append(samples[:5])
    w0.close()
    assert w0.finished
    finalize(tmp_path / "s")
    r = open_store(tmp_path / "s")
    assert r.keys == [s.key for s in samples]
    np.testing.assert_array_equal(r[7].tokens, samples[7].tokens)


@pytest.mark.parametrize("fmt", FORMATS)
def test_overlapping_ranks_are_caught(tmp_path, fmt):
    with opener(tmp_path / "s", fmt, rank=0, world_size=2) as w:
        w.append([make_sample(i) for i in range(0, 3)])
    w = opener(tmp_path / "s", fmt, rank=1, world_size=2)
    w.append([make_sample(i) for i in range(2, 5)])
    with pytest.raises(StoreError, match=r"'clip00002_[0-9a-f]+' is in \S+ and \S+; parts overlap"):
        w.close()  # the last rank to complete writes the index
    with pytest.raises(StoreError, match="parts overlap"):
        finalize(tmp_path / "s")
    assert not is_store(tmp_path / "s")


@pytest.mark.parametrize("fmt", FORMATS)
def test_commit_seconds_bounds_the_work_a_kill_loses(tmp_path, fmt):
    lazy = opener(tmp_path / "a", fmt, commit_seconds=None)
    lazy.append([make_sample(0)])
    assert lazy.committed == 0  # waits for commit_every / a full shard
    lazy.abort()
    eager = opener(tmp_path / "b", fmt, commit_seconds=0)
    eager.append([make_sample(0)])
    assert eager.committed == 1
    eager.append([make_sample(1), make_sample(2)])
    assert eager.committed == 3
    eager.close()
    assert open_store(tmp_path / "b").keys == [make_sample(i).key for i in range(3)]
