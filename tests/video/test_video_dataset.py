"""torch datasets: the clip index through a multi-worker DataLoader, random training clips."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from evatok_cli.video import (
    ClipIndexDataset,
    ClipSpec,
    VideoRef,
    clip_key,
    collate_clips,
    read_clips,
    to_model_input,
    to_uint8,
    write_mp4,
)

SPEC = ClipSpec(frames=16, height=64, width=64)


@pytest.fixture
def mixed_refs(footage, tmp_path):
    """bikes (15 clips), a text file, carphone (7 clips), and a faststart mp4 cut in half."""
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video\n")
    frames = np.concatenate([c.frames for c in read_clips(footage["bikes"], SPEC, "all")])[:160]
    full = write_mp4(tmp_path / "full.mp4", frames, fps=25).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full[: len(full) // 2])
    return [VideoRef.from_path(p) for p in (footage["bikes"], bad, footage["carphone"], cut)]


def _drain(loader):
    good, failures = [], []
    for batch, fails in loader:
        assert batch["video"].dtype == torch.uint8
        assert batch["video"].shape[1:] == (16, 64, 64, 3) or batch["video"].shape[0] == 0
        assert batch["clip_start"].dtype == torch.int64 and len(batch["key"]) == batch["video"].shape[0]
        good += list(zip(batch["source"], batch["clip_start"].tolist(), batch["key"]))
        failures += fails
    return good, failures


def test_clip_index_through_dataloader_with_bad_files(mixed_refs, footage):
    ds = ClipIndexDataset(mixed_refs, SPEC, "all")
    assert len(ds) == 15 + 1 + 7 + 10  # the text file gets one error item
    assert [str(e.path) for e in ds.failures] == [mixed_refs[1].source]
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_clips)
    good, failures = _drain(loader)
    good0, failures0 = _drain(DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate_clips))
    assert good0 == good  # same clips with or without workers
    assert [(f["source"], f["clip_start"]) for f in failures0] == [(f["source"], f["clip_start"]) for f in failures]
    ordered = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_clips, sampler=ds.worker_order(4, 2))
    good2, failures2 = _drain(ordered)
    assert sorted(good2) == sorted(good)
    assert sorted((f["source"], f["clip_start"]) for f in failures2) == sorted(
        (f["source"], f["clip_start"]) for f in failures
    )
    by_source = {r.source: sorted(s for src, s, _ in good if src == r.source) for r in mixed_refs}
    assert by_source[mixed_refs[0].source] == [16 * k for k in range(15)]
    assert by_source[mixed_refs[2].source] == [16 * k for k in range(7)]
    assert by_source[mixed_refs[1].source] == []
    cut_ok = by_source[mixed_refs[3].source]
    # clips before the cut, and the clip across it moved back to end on the last frame that decodes
    whole, moved = [s for s in cut_ok if s % 16 == 0], [s for s in cut_ok if s % 16]
    assert 0 < len(cut_ok) < 10 and whole == [16 * k for k in range(len(whole))]
    assert len(moved) <= 1 and all(whole[-1] < m < whole[-1] + 16 for m in moved)
    reasons = {(f["source"], f["clip_start"]): f["error"] for f in failures}
    assert reasons[(mixed_refs[1].source, -1)].startswith("not a video file")
    cut_fail = sorted(s for src, s in reasons if src == mixed_refs[3].source)
    assert cut_fail == [16 * k for k in range(len(cut_ok), 10)]
    # the wording depends on where FFmpeg notices (threaded decoders hit end of stream first)
    assert all(reasons[(mixed_refs[3].source, s)].startswith("truncated or corrupt") for s in cut_fail)
    assert len(good) + len(failures) == len(ds)
    assert len({k for _, _, k in good}) == len(good)
    assert good[0][2] == clip_key(mixed_refs[0].source, 0)
    item = ds[5]  # same pixels as read_clips
    assert np.array_equal(item["video"].numpy(), read_clips(footage["bikes"], SPEC, "all")[5].frames)
    assert item["key"] == clip_key(str(footage["bikes"]), 80) and item["label_hint"] == "data"


def test_clip_index_random_policy_matches_read_clips(footage):
    refs = [VideoRef.from_path(footage["bikes"]), VideoRef.from_path(footage["carphone"])]
    ds = ClipIndexDataset(refs, ClipSpec(frames=8, height=32, width=32), "random", seed=11)
    assert len(ds) == 2
    for i, ref in enumerate(refs):
        (clip,) = read_clips(ref, ClipSpec(frames=8, height=32, width=32), "random", seed=11)
        assert ds[i]["clip_start"] == clip.start and np.array_equal(ds[i]["video"].numpy(), clip.frames)


@pytest.fixture
def small_refs(make_video, tmp_path):
    refs = [VideoRef.from_path(make_video(f"v{i}.mp4", 12 + 3 * i, height=16, width=16)) for i in range(7)]
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 64)
    return refs + [VideoRef.from_path(bad)]


def _take(ds, n):
    it = iter(ds)
    return [(d["source"], d["clip_start"], d["epoch"]) for d in (next(it) for _ in range(n))]


def test_collate_all_failures():
    batch, failures = collate_clips([{"key": "k", "source": "s", "clip_start": -1, "error": "bad"}])
    assert batch["video"].shape[0] == 0 and batch["key"] == [] and failures[0]["error"] == "bad"


def test_model_input_conversion():
    u = torch.randint(0, 256, (2, 4, 6, 8, 3), dtype=torch.uint8)
    u[0, 0, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)
    x = to_model_input(u)
    assert x.shape == (2, 3, 4, 6, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x[0, 0, 0, 0, 0] == -1 and x[0, 1, 0, 0, 0] == 1
    assert torch.equal(x[1, 2, 3], u[1, 3, ..., 2].float() / 127.5 - 1)
    assert torch.equal(to_uint8(x), u)
    assert torch.equal(to_uint8(torch.full((1, 3, 1, 1, 1), 5.0)), torch.full((1, 1, 1, 1, 3), 255, dtype=torch.uint8))
    assert to_model_input(u, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        to_model_input(u.float())
    with pytest.raises(ValueError):
        to_uint8(u)


def test_reader_alive_at_fork_does_not_hang_the_child(footage):
    # A DataLoader worker inherits the parent's open readers but not their decoder threads;
    # freeing one in the child must not wait for those threads (it used to hang forever).
    import gc
    import os
    import time

    from evatok_cli.video import ClipReader

    reader = ClipReader(footage["bikes"], SPEC, threads=0)  # frame-threaded decoder
    reader.read(16)
    pid = os.fork()
    if pid == 0:  # child: drop everything inherited, as a worker's garbage collector would
        try:
            del reader
            gc.collect()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung freeing an inherited decoder")
    assert os.waitstatus_to_exitcode(status) == 0
    assert reader.read(32).frames.shape == (16, 64, 64, 3)  # the parent's reader still works
    reader.close()


def test_worker_contiguous_order():
    from evatok_cli.video import worker_contiguous_order

    for n in range(0, 60):
        for bs in (1, 3, 8):
            for nw in (0, 1, 2, 3, 4):
                order = worker_contiguous_order(n, bs, nw)
                assert sorted(order) == list(range(n))
                batches = [order[i : i + bs] for i in range(0, n, bs)]
                assert all(len(b) == bs for b in batches[:-1])  # only the last batch may be short
                per_worker: dict[int, list[int]] = {}
                for k, b in enumerate(batches):  # the DataLoader's round robin
                    per_worker.setdefault(k % max(nw, 1), []).extend(b)
                for items in per_worker.values():
                    assert items == list(range(items[0], items[0] + len(items)))  # one contiguous share
