"""Quality-target assignments (`evatok encode --target`): fewest tokens meeting a target, block by block.

Checked against whole-clip reconstructions of the same tokenizer on real footage: the block values
the walk reports are those of decoding the chosen assignment whole, every block meets the target
unless it sits at the largest level, and one level less on any block (same earlier blocks) misses it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from evatok_cli.assign import parse_target, target_assignments
from evatok_cli.metrics import get_metric
from evatok_cli.models.tokenizer import EVATokTokenizer
from evatok_cli.search.tree import reconstruct
from evatok_cli.store import open_store
from evatok_cli.video import ClipSpec, read_clips
from evatok_cli.video.dataset import to_model_input

SPEC = ClipSpec(frames=8, height=32, width=32)


@pytest.fixture(scope="module")
def model(tiny_tokenizer) -> EVATokTokenizer:
    return EVATokTokenizer.from_pretrained(tiny_tokenizer).eval()


@pytest.fixture(scope="module")
def video(footage) -> torch.Tensor:
    clips = [c.frames for n in ("carphone", "bikes", "bigbuckbunny") for c in read_clips(footage[n], SPEC)[:2]]
    return to_model_input(torch.from_numpy(np.stack(clips)))


def _block_values(model, video, assignments, metric) -> torch.Tensor:
    """(B, T) block metric of whole-clip reconstructions."""
    recon = reconstruct(model, video, assignments)
    return metric(recon, video, model.config.temporal_patch).double()


@pytest.mark.parametrize("name", ["psnr", "ssim"])
def test_fewest_tokens_that_meet_the_target_block_by_block(model, video, name):
    metric = get_metric(name)
    levels = model.space.levels
    # a target inside the range the tokenizer reaches on these clips, so the choices differ
    every = _block_values(model, video, torch.full((len(video), model.space.blocks), levels[2]), metric)
    target = float(every.median())
    choice = target_assignments(model, video, metric, target)
    a = choice.assignments
    assert a.shape == (len(video), model.space.blocks) and len({tuple(r) for r in a.tolist()}) > 1
    got = _block_values(model, video, a, metric)
    torch.testing.assert_close(choice.block_values, got, rtol=1e-4, atol=1e-4)  # the walk = whole-clip decodes
    for i in range(len(video)):
        for t in range(model.space.blocks):
            k = int(a[i, t])
            assert got[i, t] >= target - 1e-6 or k == levels[-1]
            if k > levels[0]:  # one level less on block t, earlier blocks unchanged, misses the target
                lower = a[i : i + 1].clone()
                lower[0, t] = levels[levels.index(k) - 1]
                assert _block_values(model, video[i : i + 1], lower, metric)[0, t] < target + 1e-6
    assert torch.equal(choice.met, got.mean(1) >= target)


def test_unreachable_and_trivial_targets(model, video):
    psnr = get_metric("psnr")
    hard = target_assignments(model, video, psnr, 99.0)
    assert (hard.assignments == model.space.levels[-1]).all() and not hard.met.any()
    easy = target_assignments(model, video, psnr, 0.01)
    assert (easy.assignments == model.space.levels[0]).all() and easy.met.all()


@pytest.mark.parametrize(
    "spec, msg",
    [("psnr", "METRIC=VALUE"), ("fvd=3", "METRIC=VALUE"), ("psnr=abc", "not a number"), ("ssim=1.5", "out of range")],
)
def test_parse_target_names_the_problem(spec, msg):
    with pytest.raises(ValueError, match=msg):
        parse_target(spec)
    assert parse_target("PSNR=28") == ("psnr", 28.0)


def test_encode_target_on_real_footage(tiny_tokenizer, video_dir, model, tmp_path):
    """`evatok encode --target`: the stored tokens decode to what the summary says."""
    out = tmp_path / "t.zarr"
    cmd = [sys.executable, "-m", "evatok_cli", "encode", str(video_dir), "-o", str(out), "--tokenizer"]
    cmd += [str(tiny_tokenizer), "--target", "psnr=11", "--clips", "2", "--workers", "0", "--device", "cpu"]
    res = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    t = summary["target"]
    assert t["metric"] == "psnr" and t["value"] == 11.0 and t["clips"] == summary["clips"] == 4
    assert "clips met it" in res.stderr
    store = open_store(out)
    assert store.attrs["assignment_policy"] == {"target": "psnr=11"}
    psnr, met, values = get_metric("psnr"), 0, []
    for s in store:
        clip = read_clips(s.source_path, SPEC, 2)
        frames = next(c.frames for c in clip if c.start == s.clip_start)
        v = to_model_input(torch.from_numpy(frames[None]))
        recon = model.decode(
            torch.as_tensor(s.tokens[None]).long(), torch.tensor(np.array([s.block_lengths], dtype=np.int64))
        )
        value = float(psnr(recon, v, model.config.temporal_patch).mean())
        values.append(value)
        met += value >= 11.0
    assert met == t["met"] and np.mean(values) == pytest.approx(t["mean_value"], abs=1e-3)
    bad = subprocess.run(
        [*cmd[:-8], "--target", "psnr=x", "-o", str(tmp_path / "x.zarr")], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "not a number" in bad.stderr


def test_eval_curve_threshold_points(tiny_tokenizer, video_dir, model):
    """`evatok eval curve --targets`: the paper's threshold baseline beside the uniform levels."""
    from evatok_cli.evaluation import evaluate_curve

    report = evaluate_curve(
        tiny_tokenizer, [str(video_dir)], targets="0.01,11,99", metrics=["psnr", "ssim"], num_clips=2, device="cpu"
    )
    pts = {p["label"]: p for p in report.points}
    space = model.space
    assert pts["threshold-0.01"]["mean_tokens"] == space.levels[0] * space.blocks
    assert pts["threshold-99"]["mean_tokens"] == space.levels[-1] * space.blocks
    assert pts["threshold-99"]["psnr"] == pytest.approx(pts[f"uniform-{space.levels[-1]}"]["psnr"], rel=1e-6)
    mid = pts["threshold-11"]
    assert mid["kind"] == "threshold" and mid["params"] == {"metric": "psnr", "target": 11.0}
    assert space.levels[0] * space.blocks <= mid["mean_tokens"] <= space.levels[-1] * space.blocks
    assert "savings_at_equal_quality" in mid and report.settings["targets"] == [0.01, 11.0, 99.0]


@pytest.mark.slow
def test_torchrun_eval_curve_with_thresholds_equals_one_process(tiny_tokenizer, video_dir, tmp_path):
    """`eval curve` under torchrun (through the NCCL-safe collective guard): the same points as one process."""
    import os
    import socket
    from pathlib import Path

    from evatok_cli.evaluation import evaluate_curve

    one = evaluate_curve(tiny_tokenizer, [str(video_dir)], targets="11", clips="2", device="cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    checked = Path(__file__).resolve().parent / "checked_evatok.py"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(port)]
    cmd += [str(checked), "eval", "curve", "--tokenizer", str(tiny_tokenizer), "--data", str(video_dir)]
    cmd += ["--targets", "11", "--clips", "2", "--device", "cpu", "-o", str(tmp_path / "two.json"), "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert [p["label"] for p in two["points"]] == [p["label"] for p in one.points]
    for a, b in zip(one.points, two["points"]):
        assert a["clips"] == b["clips"] == 4 and a["mean_tokens"] == b["mean_tokens"]
        assert b["psnr"] == pytest.approx(a["psnr"], rel=1e-5)
