"""`evatok train tokenizer` options of issue 17: --codebook-size (recorded, read back by encode: uint16 or
uint32 tokens) and the perceptual loss that cannot go missing silently (--lpips-backbone / --no-lpips)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from evatok_cli.cli import app
from evatok_cli.store.common import token_dtype
from evatok_cli.train.tokenizer import check_perceptual, train_tokenizer

COMMON = dict(
    preset="tiny",
    stage="final",
    assignment="uniform:16",
    batch_size=1,
    workers=0,
    log_every=1,
    warmup=1,
    discriminator=False,
)
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def videos(footage, tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    (d / "carphone.mp4").symlink_to(footage["carphone"])
    return d


def test_token_dtype_boundary():
    """DESIGN §4: uint16 tokens, uint32 once the codebook has more than 65535 entries."""
    assert [token_dtype(n) for n in (2, 1024, 8192, 16384, 65535)] == [np.dtype(np.uint16)] * 5
    assert token_dtype(65536) == np.dtype(np.uint32) and token_dtype(70000) == np.dtype(np.uint32)


def test_codebook_size_is_recorded_and_stores_follow_it(videos, tmp_path):
    """A tiny tokenizer trained with 70000 codes: config.json says so, and its token store is uint32."""
    from evatok_cli.encode import encode_videos
    from evatok_cli.models.tokenizer import EVATokTokenizer
    from evatok_cli.store import open_store

    out = train_tokenizer(
        data=[str(videos)], out=tmp_path / "big", steps=1, codebook_size=70000, perceptual_loss=False, **COMMON
    )
    assert json.loads((out / "config.json").read_text())["config"]["codebook_size"] == 70000
    assert EVATokTokenizer.from_pretrained(out).quantizer.embedding.shape[0] == 70000
    kw = dict(clips="first", assignment="uniform:16", workers=0, device="cpu", batch_size=1)
    encode_videos([videos], tmp_path / "big.zarr", tokenizer=out, **kw)
    store = open_store(tmp_path / "big.zarr")
    assert store.attrs["codebook_size"] == 70000 and store[0].tokens.dtype == np.uint32
    # the preset's codebook (1024) stays uint16
    small = train_tokenizer(data=[str(videos)], out=tmp_path / "small", steps=1, perceptual_loss=False, **COMMON)
    assert json.loads((small / "config.json").read_text())["config"]["codebook_size"] == 1024
    encode_videos([videos], tmp_path / "small.zarr", tokenizer=small, **kw)
    assert open_store(tmp_path / "small.zarr")[0].tokens.dtype == np.uint16


def test_architecture_extras_are_options(videos, tmp_path):
    """tiny's architecture extras are options: patch layers on, locality bias off, from the CLI."""
    from evatok_cli.models.tokenizer import EVATokTokenizer

    out = tmp_path / "plain"
    args = ["train", "tokenizer", "--data", str(videos), "--out", str(out), "--preset", "tiny", "--steps", "1"]
    args += ["--batch-size", "2", "--workers", "0", "--device", "cpu", "--no-lpips", "--no-disc", "--quiet"]
    res = runner.invoke(app, [*args, "--patch-depth", "2", "--dec-locality-bias", "0"])
    assert res.exit_code == 0, res.output
    final = out / "step-00000000"
    cfg = json.loads((final / "config.json").read_text())["config"]
    assert cfg["patch_depth"] == 2 and cfg["dec_locality_bias"] == 0.0
    model = EVATokTokenizer.from_pretrained(final)
    assert len(model.patch_layers) == 2 and model.dec_local_bias is None
    default = EVATokTokenizer.from_pretrained(
        train_tokenizer(data=[str(videos)], out=tmp_path / "d", steps=1, perceptual_loss=False, **COMMON)
    )
    assert len(default.patch_layers) == 0 and default.dec_local_bias is not None  # tiny keeps the bias only


def test_paper_preset_without_lpips_stops_at_once(tmp_path):
    with pytest.raises(ValueError, match="--lpips-backbone") as e:
        train_tokenizer(preset="paper", stage="proxy", data=["nowhere/"], out=tmp_path / "p", steps=1)
    assert "--no-lpips" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "p").exists()  # nothing was built or written
    res = runner.invoke(
        app, ["train", "tokenizer", "--data", "nowhere/", "--out", str(tmp_path / "c"), "--preset", "paper", "--quiet"]
    )
    assert res.exit_code == 1 and "--lpips-backbone" in res.output and "--no-lpips" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    # explicit opt-out, or LPIPS given: no error
    assert check_perceptual("paper", has_perceptual=False, wanted=False) is None
    assert check_perceptual("paper", has_perceptual=True) is None
    with pytest.raises(ValueError, match="--no-lpips.*--lpips-backbone"):
        train_tokenizer(
            preset="tiny",
            stage="proxy",
            data=["nowhere/"],
            out=tmp_path / "b",
            steps=1,
            lpips_backbone=tmp_path / "vgg.pth",
            perceptual_loss=False,
        )


def test_other_presets_warn_once(videos, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="evatok_cli.train.tokenizer"):
        train_tokenizer(data=[str(videos)], out=tmp_path / "w", steps=1, **COMMON)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "LPIPS" in r.getMessage()]
    assert len(warned) == 1 and "--lpips-backbone" in warned[0].getMessage() and "--no-lpips" in warned[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="evatok_cli.train.tokenizer"):
        train_tokenizer(data=[str(videos)], out=tmp_path / "q", steps=1, perceptual_loss=False, **COMMON)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_cli_passes_codebook_size_and_no_lpips(tmp_path):
    args = ["train", "tokenizer", "--data", "v/", "--out", "o", "--preset", "paper", "--quiet"]
    with mock.patch("evatok_cli.train.tokenizer.train_tokenizer", return_value=tmp_path) as call:
        res = runner.invoke(app, [*args, "--codebook-size", "8192", "--no-lpips"])
    assert res.exit_code == 0, res.output
    kw = call.call_args.kwargs
    assert kw["codebook_size"] == 8192 and kw["perceptual_loss"] is False and kw["lpips_backbone"] is None
    assert kw == {
        "stage": "proxy",
        "preset": "paper",
        "data": ["v/"],
        "out": Path("o"),
        "steps": 10_000,
        "batch_size": 8,
        "assignment": None,
        "router": None,
        "router_w_q": None,
        "router_w_l": None,
        "init": None,
        "resume": False,
        "seed": 0,
        "device": "auto",
        "workers": 2,
        "fps": "native",
        "checkpoint_every": 1000,
        "keep_last": 3,
        "log_every": 50,
        "stop_at": None,
        "discriminator": True,
        "stdin": None,
        "on_log": None,
        "lr": 1e-4,
        "warmup": 1000,
        "disc_start": 20_000,
        "codebook_size": 8192,
        "patch_depth": None,
        "dec_locality_bias": None,
        "lpips_backbone": None,
        "lpips_heads": None,
        "lpips_net": "vgg",
        "perceptual_loss": False,
        "perceptual_weight": 1.0,
        "align_teacher": None,
        "disc_teacher": None,
        "align_layer": None,
        "disc": None,
        "align_weight": 0.7,
        "semantic_disc_start": 20_000,
        "semantic_disc_weight": 0.1,
    }
    with mock.patch("evatok_cli.train.tokenizer.train_tokenizer", return_value=tmp_path) as call:
        res = runner.invoke(app, [*args, "--lpips-backbone", "vgg.pth"])
    assert res.exit_code == 0 and call.call_args.kwargs["perceptual_loss"] is True
    assert call.call_args.kwargs["codebook_size"] is None  # the preset's
    for bad in (
        ["--codebook-size", "1"],
        ["--no-lpips", "--lpips-backbone", "vgg.pth"],
        ["--patch-depth", "-1"],
        ["--dec-locality-bias", "-0.5"],
    ):
        with mock.patch("evatok_cli.train.tokenizer.train_tokenizer") as call:
            res = runner.invoke(app, [*args, *bad])
        assert res.exit_code == 2 and not call.called, bad
