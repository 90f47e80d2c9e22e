"""Tokenizer training (stages 1 and 4) on real footage: exact resume, checkpoints, torchrun DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evatok_cli.models.tokenizer import EVATokTokenizer
from evatok_cli.train.tokenizer import train_tokenizer

CHECKED_EVATOK = str(Path(__file__).resolve().parents[1] / "checked_evatok.py")  # torchrun entry: NCCL-safe collectives

COMMON = dict(preset="tiny", batch_size=2, workers=0, log_every=1, warmup=1, disc_start=2, lr=1e-3)


@pytest.fixture(scope="module")
def videos(footage, tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    for name in ("carphone", "bikes"):
        (d / f"{name}.mp4").symlink_to(footage[name])
    return d


def _curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_proxy_resume_equals_uninterrupted(videos, tmp_path):
    full = train_tokenizer(
        stage="proxy", data=[str(videos)], out=tmp_path / "full", steps=6, checkpoint_every=3, **COMMON
    )
    train_tokenizer(
        stage="proxy", data=[str(videos)], out=tmp_path / "part", steps=6, checkpoint_every=3, stop_at=3, **COMMON
    )
    part = train_tokenizer(
        stage="proxy", data=[str(videos)], out=tmp_path / "part", steps=6, checkpoint_every=3, resume=True, **COMMON
    )
    a, b = _curve(tmp_path / "full"), _curve(tmp_path / "part")
    assert [r["step"] for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        for k in ("loss", "l1", "psnr", "tokens", "d_loss"):
            if k in ra:
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (ra["step"], k)
    ma, mb = EVATokTokenizer.from_pretrained(full, ema=False), EVATokTokenizer.from_pretrained(part, ema=False)
    for (n, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=n)
    meta = json.loads((part / "config.json").read_text())
    assert meta["model_kind"] == "tokenizer" and meta["preset"] == "tiny" and meta["stage"] == "proxy"
    assert (part / "ema.safetensors").is_file() and (part / "train_state.pt").is_file()
    # the discriminator started at step 2
    assert "d_loss" in a[3] and "d_loss" not in a[1]


def test_final_stage_fixed_assignment_and_errors(videos, tmp_path):
    out = train_tokenizer(
        stage="final",
        data=[str(videos)],
        out=tmp_path / "u",
        steps=2,
        assignment="uniform:8",
        discriminator=False,
        **COMMON,
    )
    recs = _curve(tmp_path / "u")
    assert all(r["tokens"] == 32 for r in recs)  # 4 blocks x 8
    assert EVATokTokenizer.from_pretrained(out).config.levels == (1, 2, 4, 8, 16)
    with pytest.raises(ValueError, match="assignment"):
        train_tokenizer(stage="final", data=[str(videos)], out=tmp_path / "x", steps=1, **COMMON)
    with pytest.raises(ValueError, match="not a level"):
        train_tokenizer(
            stage="final", data=[str(videos)], out=tmp_path / "y", steps=1, assignment="uniform:3", **COMMON
        )


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_identical_weights(videos, tmp_path):
    out = tmp_path / "ddp"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        CHECKED_EVATOK,
        "train",
        "tokenizer",
        "--preset",
        "tiny",
        "--data",
        str(videos),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--disc-start",
        "1",
        "--log-every",
        "1",
        "--checkpoint-every",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    step = out / "step-00000001"
    assert (step / "rng-rank0.pt").is_file() and (step / "rng-rank1.pt").is_file()
    # DDP: both ranks hold identical weights after the step. Rank 0 saved them; compare with a
    # rank-1 dump written by the script below, run in the same torchrun job.
    dump = tmp_path / "dump"
    script = Path(__file__).with_name("ddp_tokenizer_step.py")
    res = subprocess.run(
        [
            str(Path(sys.executable).with_name("torchrun")),
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            str(script),
            str(videos),
            str(dump),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    w0, w1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    # different ranks saw different clips (the data is sharded by rank) ...
    assert not torch.equal(w0.pop("__batch__"), w1.pop("__batch__"))
    # ... yet after the step both hold identical weights
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def test_final_stage_with_router(videos, tmp_path):
    from evatok_cli.assign import RouterPolicy
    from evatok_cli.models.router import Router, router_config

    torch.manual_seed(5)
    router_dir = Router(
        router_config("tiny", frames=8, height=32, width=32, levels=(1, 2, 4, 8, 16), blocks=4, head="classify")
    ).save_pretrained(tmp_path / "router", preset="tiny")
    out = train_tokenizer(
        stage="final", data=[str(videos)], out=tmp_path / "f", steps=2, router=router_dir, discriminator=False, **COMMON
    )
    meta = json.loads((out / "config.json").read_text())
    assert meta["stage"] == "final" and meta["assignment"].startswith("router:")
    # the logged token counts are the router's choices for the step's clips
    from evatok_cli.models.tokenizer import tokenizer_config
    from evatok_cli.train.data import clip_batches
    from evatok_cli.video import ClipSpec, list_inputs
    from evatok_cli.video.dataset import to_model_input

    policy = RouterPolicy.load(router_dir, tokenizer_config("tiny").space, (8, 32, 32), torch.device("cpu"))
    batch = next(
        clip_batches(list_inputs([str(videos)]), ClipSpec(frames=8, height=32, width=32), seed=0, local_batch=2)(0)
    )
    expected = float(policy(to_model_input(batch["video"])).sum(1).float().mean())
    assert _curve(tmp_path / "f")[0]["tokens"] == pytest.approx(expected)
    # an ensemble of reward routers assigns too, and the config names both
    members = []
    for seed in (6, 7):
        torch.manual_seed(seed)
        cfg = router_config("tiny", frames=8, height=32, width=32, levels=(1, 2, 4, 8, 16), blocks=4, head="reward")
        members.append(Router(cfg).save_pretrained(tmp_path / f"rr{seed}", preset="tiny"))
    out = train_tokenizer(
        stage="final", data=[str(videos)], out=tmp_path / "e", steps=1, router=members, discriminator=False, **COMMON
    )
    assert json.loads((out / "config.json").read_text())["assignment"] == f"router:{members[0]}+{members[1]}"
    with pytest.raises(ValueError, match="not both"):
        train_tokenizer(
            stage="final",
            data=[str(videos)],
            out=tmp_path / "g",
            steps=1,
            router=router_dir,
            assignment="uniform:4",
            **COMMON,
        )


def test_lpips_perceptual_loss_from_weight_files(videos, tmp_path):
    """--lpips-backbone/--lpips-heads: LPIPS loads from files on disk and its term is trained and logged."""
    from evatok_cli.metrics.lpips import LPIPS

    ref = LPIPS.random("alex", seed=7)
    backbone = {f"features.{k}": v for k, v in ref.backbone.features.state_dict().items()}
    torch.save(backbone, tmp_path / "alexnet.pth")
    torch.save(ref.heads.state_dict(), tmp_path / "alex_heads.pth")
    train_tokenizer(
        stage="proxy",
        data=[str(videos)],
        out=tmp_path / "p",
        steps=2,
        discriminator=False,
        lpips_backbone=tmp_path / "alexnet.pth",
        lpips_heads=tmp_path / "alex_heads.pth",
        lpips_net="alex",
        **COMMON,
    )
    recs = _curve(tmp_path / "p")
    assert all("perceptual" in r and r["perceptual"] > 0 for r in recs)
    with pytest.raises((ValueError, FileNotFoundError), match="missing.pth"):
        train_tokenizer(
            stage="proxy",
            data=[str(videos)],
            out=tmp_path / "q",
            steps=1,
            discriminator=False,
            lpips_backbone=tmp_path / "missing.pth",
            lpips_net="alex",
            **COMMON,
        )


def test_resume_into_another_configuration_is_one_line(videos, tmp_path):
    """A checkpoint resumes only into the configuration it was trained with: a one-line error, not a traceback."""
    from typer.testing import CliRunner

    from evatok_cli.cli import app

    out = tmp_path / "run"
    train_tokenizer(stage="proxy", data=[str(videos)], out=out, steps=2, checkpoint_every=1, stop_at=1, **COMMON)
    args = ["train", "tokenizer", "--stage", "proxy", "--preset", "tiny", "--data", str(videos), "--out", str(out)]
    args += ["--steps", "2", "--batch-size", "2", "--workers", "0", "--resume", "--codebook-size", "512", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "trained with another model configuration (codebook_size 1024 -> 512)" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) <= 3
