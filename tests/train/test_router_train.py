"""Router training (stage 3) on real footage labels: overfitting both heads, budgets, exact resume, CLI."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_route import make_labels_store  # noqa: E402

from evatok_cli.assign import budget_assignments, choose_assignments  # noqa: E402
from evatok_cli.cli import app  # noqa: E402
from evatok_cli.labels import concat_labels, load_labels  # noqa: E402
from evatok_cli.models.router import Router  # noqa: E402
from evatok_cli.route import route  # noqa: E402
from evatok_cli.store import StoreError, open_store, open_writer  # noqa: E402
from evatok_cli.train.router import make_targets, train_router  # noqa: E402

CHECKED_EVATOK = str(Path(__file__).resolve().parents[1] / "checked_evatok.py")  # torchrun entry: NCCL-safe collectives

COMMON = dict(preset="tiny", batch_size=8, workers=0, device="cpu", warmup=5, ema_decay=0.0, lr=1e-2)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def videos(footage, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    for name in ("carphone", "bikes"):
        (d / f"{name}.mp4").symlink_to(footage[name])
    return d


@pytest.fixture(scope="module")
def labels_path(videos, tmp_path_factory) -> Path:
    return make_labels_store(tmp_path_factory.mktemp("labels") / "labels.zarr", [videos])


def _curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_classify_overfits(videos, labels_path, tmp_path):
    final = train_router(
        labels=labels_path,
        data=[str(videos)],
        head="classify",
        out=tmp_path / "c",
        steps=80,
        log_every=10,
        checkpoint_every=80,
        **COMMON,
    )
    curve = _curve(tmp_path / "c")
    assert curve[-1]["loss"] < 0.2 * curve[0]["loss"]
    meta = json.loads((final / "config.json").read_text())
    assert meta["model_kind"] == "router" and meta["config"]["head"] == "classify" and meta["labels"]["clips"] == 8
    assert meta["labels"]["w_q"] == 1.2 and meta["clip"]["frames"] == 8
    res = route(final, [str(videos)], eval_labels=labels_path, device="cpu")
    ev = res.summary["eval"]
    assert ev["top1"] == 1.0 and ev["top5"] == 1.0 and ev["p_router"] == pytest.approx(1.0)
    assert ev["p_uniform_per_clip"] < 1.0
    lab = load_labels(labels_path)
    assert [r["index"] for r in res.records] == [int(lab.best[lab.keys.index(r["key"])]) for r in res.records]


def test_reward_overfits_and_budget_beats_uniform(videos, labels_path, tmp_path):
    final = train_router(
        labels=labels_path,
        data=[str(videos)],
        head="reward",
        out=tmp_path / "r",
        steps=80,
        log_every=10,
        checkpoint_every=80,
        **COMMON,
    )
    curve = _curve(tmp_path / "r")
    assert curve[-1]["loss"] < 0.1 * curve[0]["loss"]  # masked MSE to the quality z-scores
    lab = load_labels(labels_path)
    Q, lengths = lab.quality(), lab.space.lengths()
    for k in (2, 4, 8):  # budget = the uniform assignment's length
        uniform = lab.space.to_index(lab.space.uniform(k))
        res = route(final, [str(videos)], eval_labels=labels_path, budget=float(lengths[uniform]), device="cpu")
        rows = [lab.keys.index(r["key"]) for r in res.records]
        idx = np.array([r["index"] for r in res.records])
        assert res.summary["mean_tokens"] == lengths[idx].mean() <= lengths[uniform]
        assert res.summary["lambda"] > 0
        assert Q[rows, idx].sum() > Q[rows, uniform].sum(), k  # more true quality at <= the same mean tokens
    ev = route(final, [str(videos)], eval_labels=labels_path, device="cpu").summary["eval"]
    assert ev["p_router"] > ev["p_uniform_global"]


def test_resume_equals_uninterrupted(videos, labels_path, tmp_path):
    kw = dict(
        labels=labels_path,
        data=[str(videos)],
        head="classify",
        steps=6,
        checkpoint_every=3,
        log_every=1,
        soft_tau=0.5,
        **{**COMMON, "batch_size": 3, "ema_decay": 0.9},
    )
    full = train_router(out=tmp_path / "full", **kw)
    train_router(out=tmp_path / "part", stop_at=3, **kw)
    part = train_router(out=tmp_path / "part", resume=True, **kw)
    a, b = _curve(tmp_path / "full"), _curve(tmp_path / "part")
    assert [r["step"] for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        for k in ("loss", "top1", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    for ema in (False, True):
        ma, mb = Router.from_pretrained(full, ema=ema), Router.from_pretrained(part, ema=ema)
        for (n, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    assert (part / "ema.safetensors").is_file() and (part / "train_state.pt").is_file()
    assert json.loads((part / "config.json").read_text())["labels"]["soft_tau"] == 0.5


def test_streamed_clips_equal_preloaded(videos, labels_path, tmp_path):
    kw = dict(
        labels=labels_path, data=[str(videos)], head="reward", steps=3, log_every=1, **{**COMMON, "batch_size": 3}
    )
    train_router(out=tmp_path / "mem", preload=True, **kw)
    train_router(out=tmp_path / "stream", preload=False, **kw)
    for ra, rb in zip(_curve(tmp_path / "mem"), _curve(tmp_path / "stream")):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)


def test_missing_sources_skipped_and_errors(videos, tmp_path, caplog):
    path = make_labels_store(tmp_path / "l.zarr", [videos], clips_per_video=1, extra_sources=("/nowhere/ghost.mp4",))
    with caplog.at_level(logging.WARNING):
        final = train_router(labels=path, data=[str(videos)], head="reward", out=tmp_path / "o", steps=1, **COMMON)
    assert "ghost.mp4" in caplog.text and "not found" in caplog.text
    assert json.loads((final / "config.json").read_text())["labels"]["clips"] == 2
    only_bikes = tmp_path / "only"
    only_bikes.mkdir()
    shutil.copy(videos / "bikes.mp4", only_bikes / "other.mp4")  # neither the name nor the real path matches
    with pytest.raises(ValueError, match="none of the 3 labelled clips"):
        train_router(labels=path, data=[str(only_bikes)], head="reward", out=tmp_path / "x", steps=1, **COMMON)
    with pytest.raises(ValueError, match="classify head only"):
        train_router(
            labels=path, data=[str(videos)], head="reward", soft_tau=0.1, out=tmp_path / "y", steps=1, **COMMON
        )
    with pytest.raises(StoreError, match="not an evatok token store"):
        train_router(labels=videos, data=[str(videos)], head="reward", out=tmp_path / "z", steps=1, **COMMON)
    with open_writer(tmp_path / "tokens.zarr", attrs={**open_store(path).attrs, "kind": "encode"}, num_blocks=4) as w:
        w.append([])
    with pytest.raises(ValueError, match="not a labels store"):
        train_router(
            labels=tmp_path / "tokens.zarr", data=[str(videos)], head="reward", out=tmp_path / "z", steps=1, **COMMON
        )


def _train_router_cli(first: Path, second: Path, videos: Path, out: Path, *extra: str):
    """`evatok train router` (reward head) on two labels stores, through the CLI."""
    args = ["train", "router", "--labels", str(first), "--labels", str(second), "--data", str(videos)]
    return CliRunner().invoke(app, [*args, "--head", "reward", "--out", str(out), *extra, "--quiet"])


def test_two_label_stores_train_as_one(videos, tmp_path):
    """A later batch searched with the first store's calibration (--stats) trains with it as one store."""
    first = make_labels_store(tmp_path / "a.zarr", [videos / "carphone.mp4"])
    a = load_labels(first)
    more = make_labels_store(tmp_path / "b.zarr", [videos / "bikes.mp4"], calibration=(a.mean, a.std))
    b = load_labels(more)
    both = concat_labels([a, b])
    assert both.keys == a.keys + b.keys and len(both) == len(a) + len(b) == 8
    np.testing.assert_array_equal(both.metric, np.concatenate([a.metric, b.metric]))
    np.testing.assert_array_equal(
        both.best_assignments(1.0, 0.3), np.concatenate([a.best_assignments(1.0, 0.3), b.best_assignments(1.0, 0.3)])
    )
    final = train_router(labels=[first, more], data=[str(videos)], head="reward", out=tmp_path / "r", steps=2, **COMMON)
    meta = json.loads((final / "config.json").read_text())
    assert meta["labels"]["clips"] == 8 and meta["labels"]["path"] == f"{first},{more}"
    res = _train_router_cli(
        first,
        more,
        videos,
        tmp_path / "cli",
        "--preset",
        "tiny",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--workers",
        "0",
        "--device",
        "cpu",
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "cli" / "step-00000000" / "config.json").read_text())["labels"]["clips"] == 8


def test_label_stores_of_other_searches_are_refused(videos, tmp_path):
    first = make_labels_store(tmp_path / "a.zarr", [videos / "carphone.mp4"])
    other = make_labels_store(tmp_path / "b.zarr", [videos / "bikes.mp4"])  # its own calibration
    with pytest.raises(ValueError, match=r"b\.zarr: cannot be read with .*a\.zarr: calibration mean/std .*--stats"):
        train_router(labels=[first, other], data=[str(videos)], head="reward", out=tmp_path / "r", steps=1, **COMMON)
    with pytest.raises(ValueError, match="clip carphone.* is also labelled in"):
        concat_labels([load_labels(first), load_labels(first)])
    res = _train_router_cli(first, other, videos, tmp_path / "cli", "--device", "cpu")
    assert res.exit_code == 1 and "calibration mean/std" in res.output and len(res.output.strip().splitlines()) == 1


def test_targets_follow_the_weights(labels_path):
    lab = load_labels(labels_path)
    t = make_targets(lab, "classify")
    assert torch.equal(t.best, torch.from_numpy(lab.best))
    t = make_targets(lab, "classify", w_q=0.4, w_l=1.6, soft_tau=0.2)
    R = lab.rewards(0.4, 1.6)
    assert torch.equal(t.best, torch.from_numpy(np.nanargmax(R, axis=1)))
    torch.testing.assert_close(t.soft.sum(1), torch.ones(len(lab)))
    assert torch.equal(t.soft.argmax(1), t.best)
    t = make_targets(lab, "reward")
    torch.testing.assert_close(t.quality, torch.from_numpy(lab.quality()).float())


def test_cli_train_router_calls_library(tmp_path):
    with mock.patch("evatok_cli.train.router.train_router", return_value=tmp_path / "step-00000009") as m:
        res = CliRunner().invoke(
            app,
            [
                "train",
                "router",
                "--labels",
                "l.zarr",
                "--data",
                "v",
                "--head",
                "reward",
                "--preset",
                "tiny",
                "--out",
                str(tmp_path),
                "--steps",
                "10",
                "--w-q",
                "1.4",
                "--w-l",
                "0.6",
                "--quiet",
            ],
        )
    assert res.exit_code == 0, res.output
    m.assert_called_once_with(
        labels=[Path("l.zarr")],
        data=["v"],
        head="reward",
        preset="tiny",
        out=tmp_path,
        steps=10,
        batch_size=32,
        reward_form="joint",
        quality="calibrated",
        flip=False,
        soft_tau=None,
        w_q=1.4,
        w_l=0.6,
        resume=False,
        seed=0,
        device="auto",
        workers=2,
        checkpoint_every=1000,
        keep_last=3,
        log_every=50,
        stop_at=None,
        stdin=None,
        on_log=None,
        lr=3e-4,
        warmup=500,
    )
    res = CliRunner().invoke(
        app, ["train", "router", "--labels", "l", "--data", "v", "--out", "o", "--head", "reward", "--soft-tau", "0.1"]
    )
    assert res.exit_code == 2 and "--soft-tau" in res.stderr
    res = CliRunner().invoke(app, ["train", "router", "--labels", "l", "--data", "v", "--out", "o", "--preset", "huge"])
    assert res.exit_code == 2
    res = CliRunner().invoke(
        app, ["train", "router", "--labels", "l", "--data", "v", "--out", "o", "--reward-form", "blocks"]
    )
    assert res.exit_code == 2 and "--reward-form applies to --head reward" in res.stderr


def test_reward_blocks_form_fits_the_additive_quality(videos, labels_path, tmp_path):
    """The blocks form (T*m outputs, Q(a) = mean_t u[t, a_t]) learns every clip's 625 qualities from
    20 numbers: on real footage the fit is close, and it routes like the joint head."""
    final = train_router(
        labels=labels_path,
        data=[str(videos)],
        head="reward",
        reward_form="blocks",
        out=tmp_path / "b",
        steps=80,
        log_every=10,
        checkpoint_every=80,
        **COMMON,
    )
    model = Router.from_pretrained(final)
    assert model.config.reward_form == "blocks" and model.head.out_features == 4 * 5
    curve = _curve(tmp_path / "b")
    spread = float(np.nanvar(load_labels(labels_path).quality()))
    assert curve[-1]["loss"] < 0.1 * spread, (curve[-1]["loss"], spread)  # most of Q's variance is additive
    ev = route(final, [str(videos)], eval_labels=labels_path, device="cpu").summary["eval"]
    assert ev["p_router"] > ev["p_uniform_global"]


@pytest.mark.slow
def test_torchrun_two_ranks_train_router_in_sync(videos, labels_path, tmp_path):
    """`evatok train router` under torchrun (gloo): both ranks train and checkpoint (per-rank RNG state).

    Weight synchronisation itself is the shared DDP wrapper's, checked bit for bit in
    tests/train/test_tokenizer_train.py and tests/train/test_gpt_train.py."""
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        CHECKED_EVATOK,
        "train",
        "router",
        "--labels",
        str(labels_path),
        "--data",
        str(videos),
        "--head",
        "classify",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--checkpoint-every",
        "3",
        "--device",
        "cpu",
        "--quiet",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    step = out / "step-00000002"
    assert (step / "rng-rank0.pt").is_file() and (step / "rng-rank1.pt").is_file()
    assert Router.from_pretrained(step, ema=False).config.head == "classify"
    recs = _curve(out)
    assert [r["step"] for r in recs][-1] == 2 and all(np.isfinite(r["loss"]) for r in recs)


def test_per_clip_quality_targets_keep_every_routing_decision(labels_path):
    """Per-clip targets drop each clip's mean: the argmax at any weights and every budget choice stay the same."""
    lab = load_labels(labels_path)
    cal = make_targets(lab, "reward").quality.double().numpy()
    pc = make_targets(lab, "reward", quality="per-clip").quality.double().numpy()
    np.testing.assert_allclose(np.nanmean(pc, axis=1), 0.0, atol=1e-5)
    offset = cal - pc  # one number per clip
    np.testing.assert_allclose(offset, offset[:, :1].repeat(offset.shape[1], 1), atol=1e-5)
    for w_q, w_l in ((1.2, 0.8), (1.6, 0.4), (0.4, 1.6)):
        np.testing.assert_array_equal(
            choose_assignments(cal, "reward", lab.space, w_q, w_l),
            choose_assignments(pc, "reward", lab.space, w_q, w_l),
        )
    for b in (40.0, 100.0):
        np.testing.assert_array_equal(budget_assignments(cal, lab.space, b)[0], budget_assignments(pc, lab.space, b)[0])
    with pytest.raises(ValueError, match="quality must be one of"):
        make_targets(lab, "reward", quality="absolute")


def test_flip_augmentation_trains_and_is_recorded(videos, labels_path, tmp_path):
    """--flip: a resumed run mirrors the same clips as an uninterrupted one; the config records it."""
    kw = dict(labels=labels_path, data=[str(videos)], head="reward", quality="per-clip", steps=4, log_every=1)
    kw.update(checkpoint_every=2, flip=True, **COMMON)
    full = train_router(out=tmp_path / "full", **kw)
    train_router(out=tmp_path / "part", stop_at=2, **kw)
    train_router(out=tmp_path / "part", resume=True, **kw)
    for ra, rb in zip(_curve(tmp_path / "full"), _curve(tmp_path / "part")):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=1e-6)
    meta = json.loads((full / "config.json").read_text())
    assert meta["flip"] is True and meta["labels"]["quality"] == "per-clip"
    train_router(out=tmp_path / "plain", **{**kw, "flip": False, "steps": 4})
    assert _curve(tmp_path / "plain")[1]["loss"] != _curve(tmp_path / "full")[1]["loss"]
