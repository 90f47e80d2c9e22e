"""Stage 2 search (EVATok §3.2): reward, exact prefix tree vs brute force, beam, calibration, datasets.

A ``tiny`` proxy with seeded random weights (untrained is enough: the tests compare two ways of
computing the same numbers) on real footage (carphone, bikes).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.metrics import get_metric
from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
from evatok_cli.search import (
    CalibrationStats,
    beam_search,
    best_assignments,
    brute_force_search,
    calibrate,
    exact_search,
    rewards,
    search_dataset,
)
from evatok_cli.store import open_store
from evatok_cli.video import ClipSpec, list_inputs, read_clips
from evatok_cli.video.dataset import to_model_input

CHECKED_EVATOK = str(Path(__file__).resolve().parents[0] / "checked_evatok.py")  # torchrun entry: NCCL-safe collectives

SPEC = ClipSpec(frames=8, height=32, width=32)
CAL = CalibrationStats(mean=11.0, std=1.0, count=8, seed=0, metric="psnr")


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return EVATokTokenizer(tokenizer_config("tiny")).save_pretrained(
        tmp_path_factory.mktemp("proxy") / "tiny", preset="tiny"
    )


@pytest.fixture(scope="module")
def model(proxy) -> EVATokTokenizer:
    return EVATokTokenizer.from_pretrained(proxy).eval()


@pytest.fixture(scope="module")
def video(footage) -> torch.Tensor:
    frames = [read_clips(footage[n], SPEC)[0].frames for n in ("carphone", "bikes")]
    return to_model_input(torch.from_numpy(np.stack(frames)))  # (2, 3, 8, 32, 32)


@pytest.fixture(scope="module")
def exact(model, video):
    return exact_search(model, video, "psnr")


@pytest.fixture(scope="module")
def good_videos(footage, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good")
    for n in ("carphone", "bikes"):
        (d / f"{n}.mp4").symlink_to(footage[n])
    return d


# ------------------------------------------------------------------------------------ reward
def test_rewards_formula_orientation_and_nan():
    space = AssignmentSpace((1, 2, 4), 2)
    m = np.arange(9, dtype=np.float64)[None]  # (1, 9)
    r = rewards(m, {"mean": 4.0, "std": 2.0}, space, 1.5, 0.5, True)
    np.testing.assert_allclose(r, 1.5 * (m - 4) / 2 - 0.5 * space.lengths_z())
    lo = rewards(m, CalibrationStats(4.0, 2.0, 9, 0), space, 1.5, 0.5, False)  # LPIPS: lower is better
    np.testing.assert_allclose(lo, -1.5 * (m - 4) / 2 - 0.5 * space.lengths_z())
    m[0, 3] = np.nan
    assert np.isnan(rewards(m, CAL, space, 1.0, 1.0, True)[0, 3])
    assert best_assignments(np.array([[1.0, np.nan, 3.0, 3.0]])).tolist() == [2]  # ties -> lowest index
    with pytest.raises(ValueError, match="end with 9"):
        rewards(np.zeros(8), CAL, space, 1.0, 1.0, True)
    with pytest.raises(ValueError):
        CalibrationStats(1.0, 0.0, 2, 0)


# ------------------------------------------------------------------------------------ search
def test_exact_equals_brute_force(model, video, exact):
    brute = brute_force_search(model, video[1:], "psnr")  # the second clip of exact's batch of two
    assert exact.metric.shape == (2, 625) and brute.metric.shape == (1, 625)
    torch.testing.assert_close(exact.metric[1:], brute.metric, rtol=1e-4, atol=0)
    assert exact.stats.block_evals == 2 * 780 and exact.stats.block_evals_per_clip == 780
    assert brute.stats.block_evals_per_clip == 2500
    space = model.space
    re, rb = (rewards(x, CAL, space, 1.2, 0.8, True) for x in (exact.metric[1:], brute.metric))
    np.testing.assert_allclose(re, rb, rtol=1e-4, atol=1e-4)
    assert best_assignments(re).tolist() == best_assignments(rb).tolist()
    # PSNR grows with tokens on the whole; at least the clip metric varies over assignments
    assert float(exact.metric.std(1).min()) > 0


def test_exact_is_chunk_and_batch_invariant(model, video, exact):
    small = exact_search(model, video[:1], "psnr", chunk=125)  # 5 DFS chunks at the last level
    torch.testing.assert_close(small.metric[0], exact.metric[0], rtol=1e-5, atol=1e-5)
    assert small.stats.block_evals == 780


def test_beam_full_width_equals_exact(model, video, exact):
    full = beam_search(model, video[1:], "psnr", width=625, calibration=CAL)
    torch.testing.assert_close(full.metric[0], exact.metric[1], rtol=1e-5, atol=1e-5)
    assert full.stats.block_evals == 780


def test_beam_narrow_reward_gap(model, video, exact, record_property):
    space = model.space
    beam = beam_search(model, video, "psnr", width=5, calibration=CAL)
    assert beam.stats.block_evals_per_clip == 5 + 3 * 25
    assert (torch.isnan(beam.metric).sum(1) == 625 - 25).all()
    r_exact = rewards(exact.metric, CAL, space, 1.2, 0.8, True).max(1)
    r_beam = np.nanmax(rewards(beam.metric, CAL, space, 1.2, 0.8, True), 1)
    gap = r_exact - r_beam
    record_property("beam5_reward_gap", gap.tolist())
    assert (gap >= -1e-6).all()
    # explored entries equal the exact ones
    seen = ~torch.isnan(beam.metric)
    torch.testing.assert_close(beam.metric[seen], exact.metric[seen], rtol=1e-5, atol=1e-5)


def test_beam_orientation_lower_is_better(model, video):
    """A lower-is-better metric (-PSNR) with the mirrored calibration ranks prefixes exactly like PSNR."""

    class NegPSNR:
        name, higher_is_better = "negpsnr", False
        psnr = get_metric("psnr")

        def __call__(self, recon, target, frames_per_block):
            return -self.psnr(recon, target, frames_per_block)

    neg_cal = CalibrationStats(-CAL.mean, CAL.std, CAL.count, 0)
    a = beam_search(model, video, "psnr", width=3, calibration=CAL)
    b = beam_search(model, video, NegPSNR(), width=3, calibration=neg_cal)
    assert torch.equal(torch.isnan(a.metric), torch.isnan(b.metric))
    torch.testing.assert_close(-b.metric.nan_to_num(), a.metric.nan_to_num())


# ------------------------------------------------------------------------------- calibration
def test_calibrate_deterministic_and_skips_bad_videos(model, good_videos, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"\0not a video" * 100)
    refs = list_inputs([good_videos, tmp_path / "broken.mp4"])
    metric = get_metric("psnr")
    a = calibrate(model, refs, SPEC, metric, count=6, seed=3, batch_size=4)
    b = calibrate(model, refs, SPEC, metric, count=6, seed=3, batch_size=2)
    assert a.count == b.count < 6  # the broken video's pairs are left out
    assert a.mean == pytest.approx(b.mean, rel=1e-6) and a.std == pytest.approx(b.std, rel=1e-5)
    assert a.metric == "psnr" and a.seed == 3
    path = a.save(tmp_path / "stats.json")
    assert CalibrationStats.load(path) == a
    with pytest.raises(ValueError, match="not a calibration file"):
        CalibrationStats.load(tmp_path / "broken.mp4")


# ---------------------------------------------------------------------------------- datasets
def _by_key(path: Path) -> dict[str, tuple[int, np.ndarray, float, np.ndarray]]:
    store = open_store(path)
    return {s.key: (s.assignment, s.extra["metric"], float(s.extra["reward"]), np.asarray(s.tokens)) for s in store}


@pytest.fixture(scope="module")
def baseline(proxy, good_videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "labels.zarr"
    summary = search_dataset(proxy, [str(good_videos)], out, calibration=8, workers=0, device="cpu")
    return out, summary


def test_dataset_store_contents(baseline, model):
    out, summary = baseline
    assert summary.clips == 2 and summary.failures == 0 and summary.block_evals_per_clip == 780
    store = open_store(out)
    s = store.attrs["search"]
    assert store.attrs["kind"] == "labels" and s["metric"] == "psnr" and s["higher_is_better"] is True
    assert (s["w_q"], s["w_l"], s["beam"]) == (1.2, 0.8, None)
    assert set(s["calibration"]) == {"mean", "std", "count", "seed"} and s["calibration"]["count"] == 8
    for sample in store:
        m = sample.extra["metric"]
        assert m.shape == (625,) and m.dtype == np.float32 and not np.isnan(m).any()
        r = rewards(m, s["calibration"], model.space, 1.2, 0.8, True)
        assert int(np.argmax(r)) == sample.assignment
        assert float(sample.extra["reward"]) == pytest.approx(r.max(), rel=1e-5)
        assert tuple(sample.block_lengths) == model.space.to_tuple(sample.assignment)
        video = to_model_input(torch.from_numpy(read_clips(sample.source, SPEC)[0].frames[None]))
        tokens, _ = model.encode(video, torch.tensor([model.space.to_tuple(sample.assignment)]))
        assert np.array_equal(tokens[0].numpy(), sample.tokens)


class _Stop(Exception):
    pass


def test_interrupted_search_resumes_to_the_same_store(baseline, proxy, good_videos, tmp_path, monkeypatch):
    out = tmp_path / "labels.wds"

    def stop(done, total):
        raise _Stop

    with pytest.raises(_Stop):
        search_dataset(
            proxy, [str(good_videos)], out, format="wds", calibration=8, batch_size=1, workers=0, on_progress=stop
        )
    assert not (out / "index.json").exists()
    # wds commits per shard; flush on the way out left the first clip committed. The rerun takes
    # the calibration stored in the unfinished store (so a resume never changes the reward).
    monkeypatch.setattr("evatok_cli.search.job.calibrate", lambda *a, **k: pytest.fail("recalibrated on resume"))
    resumed = search_dataset(proxy, [str(good_videos)], out, format="wds", calibration=8, batch_size=1, workers=0)
    assert (resumed.resumed, resumed.clips) == (1, 1)
    again = search_dataset(proxy, [str(good_videos)], out, format="wds", calibration=8, batch_size=1, workers=0)
    assert again.nothing_to_do and again.clips == 0 and again.resumed == 2
    want, got = _by_key(baseline[0]), _by_key(out)
    assert sorted(want) == sorted(got)
    for k, (a, m, r, tok) in want.items():
        assert got[k][0] == a and np.array_equal(got[k][3], tok)
        np.testing.assert_allclose(got[k][1], m, rtol=1e-5)


def test_stats_reuse_gives_the_same_labels(baseline, proxy, good_videos, tmp_path):
    cal = open_store(baseline[0]).attrs["search"]["calibration"]
    path = tmp_path / "stats.json"
    path.write_text(json.dumps({"metric": "psnr", **cal, "proxy_sha256": None}))
    one = str(good_videos / "carphone.mp4")  # the same source string as found in the directory
    summary = search_dataset(proxy, [one], tmp_path / "s.zarr", stats=path, workers=0)
    assert summary.calibration_s < 1.0 and summary.calibration["mean"] == cal["mean"]
    assert open_store(tmp_path / "s.zarr").attrs["search"]["calibration"] == cal
    want, got = _by_key(baseline[0]), _by_key(tmp_path / "s.zarr")
    assert len(got) == 1 and all(want[k][0] == v[0] for k, v in got.items())
    with pytest.raises(ValueError, match="metric 'psnr'"):
        search_dataset(proxy, [str(good_videos)], tmp_path / "x.zarr", metric="ssim", stats=path, workers=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(baseline, proxy, good_videos, tmp_path):
    out = tmp_path / "ddp.zarr"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        CHECKED_EVATOK,
        "search",
        "--tokenizer",
        str(proxy),
        "--data",
        str(good_videos),
        "-o",
        str(out),
        "--calibration",
        "8",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--json",
        "--quiet",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["clips"] == 2
    store = open_store(out)
    assert store.layout.world_size == 2
    want_cal = open_store(baseline[0]).attrs["search"]["calibration"]
    got_cal = store.attrs["search"]["calibration"]
    assert got_cal["count"] == want_cal["count"]
    assert got_cal["mean"] == pytest.approx(want_cal["mean"], rel=1e-6)
    assert got_cal["std"] == pytest.approx(want_cal["std"], rel=1e-5)
    want, got = _by_key(baseline[0]), _by_key(out)
    assert sorted(want) == sorted(got)
    for k, (a, m, r, tok) in want.items():
        assert got[k][0] == a and np.array_equal(got[k][3], tok)
        np.testing.assert_allclose(got[k][1], m, rtol=1e-5)
        assert got[k][2] == pytest.approx(r, rel=1e-4, abs=1e-4)
