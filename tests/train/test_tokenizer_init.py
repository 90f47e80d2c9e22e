"""`evatok train tokenizer --init DIR`: start from another tokenizer's (EMA) weights with a fresh optimizer;
a mismatched preset is a clear error; a checkpoint found by --resume wins over --init."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from evatok_cli.checkpoint import save_model, weights_sha256
from evatok_cli.cli import app
from evatok_cli.models.router import Router, router_config
from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
from evatok_cli.train import tokenizer as train_tok
from evatok_cli.train.checkpoints import write_state
from evatok_cli.train.tokenizer import TokenizerTask, train_tokenizer

COMMON = dict(
    preset="tiny",
    stage="final",
    assignment="uniform:8",
    batch_size=2,
    workers=0,
    log_every=1,
    warmup=1,
    lr=1e-3,
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


def _source(path: Path, seed: int, **overrides) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tokenizer training output (one step dir) whose EMA differs from its raw weights."""
    torch.manual_seed(seed)
    model = EVATokTokenizer(tokenizer_config("tiny", **overrides))
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    step = path / "step-00000004"
    save_model(step, model, model.config, kind="tokenizer", preset="tiny", ema=ema)
    write_state(step, {"step": 4})
    return step, ema


@pytest.fixture
def spy(monkeypatch) -> dict[int, dict]:
    """What the model, its EMA and the optimizer hold when each step starts."""
    seen: dict[int, dict] = {}
    orig = TokenizerTask.train_step

    def train_step(self, batch, step):
        seen[step] = {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "ema": {k: v.clone() for k, v in self.ema.shadow.items()},
            "opt_state": len(self.opt.state),
        }
        return orig(self, batch, step)

    monkeypatch.setattr(TokenizerTask, "train_step", train_step)
    return seen


def test_init_starts_from_the_source_ema_weights(videos, tmp_path, spy):
    step, ema = _source(tmp_path / "src", seed=3)
    out = train_tokenizer(data=[str(videos)], out=tmp_path / "run", steps=1, init=tmp_path / "src", **COMMON)
    start = spy[0]
    assert start["opt_state"] == 0  # a fresh optimizer
    for k, v in ema.items():
        torch.testing.assert_close(start["model"][k], v, rtol=0, atol=0, msg=k)
        torch.testing.assert_close(start["ema"][k], v.float(), rtol=0, atol=0, msg=k)
    meta = json.loads((out / "config.json").read_text())
    assert meta["init_from"] == {"path": str(step), "preset": "tiny", "sha256": weights_sha256(step), "weights": "ema"}


def test_resume_checkpoint_wins_over_init(videos, tmp_path, spy, caplog):
    _source(tmp_path / "a", seed=3)
    other, _ = _source(tmp_path / "b", seed=4)
    train_tokenizer(data=[str(videos)], out=tmp_path / "run", steps=2, stop_at=1, init=tmp_path / "a", **COMMON)
    first = json.loads((tmp_path / "run" / "step-00000000" / "config.json").read_text())["init_from"]
    saved = EVATokTokenizer.from_pretrained(tmp_path / "run" / "step-00000000", ema=False).state_dict()
    with caplog.at_level(logging.INFO, logger=train_tok.__name__):
        out = train_tokenizer(data=[str(videos)], out=tmp_path / "run", steps=2, resume=True, init=other, **COMMON)
    assert any("--init" in r.getMessage() and "ignored" in r.getMessage() for r in caplog.records)
    for k, v in saved.items():  # step 1 starts from the checkpoint, not from b
        torch.testing.assert_close(spy[1]["model"][k], v, rtol=0, atol=0, msg=k)
    assert json.loads((out / "config.json").read_text())["init_from"] == first  # still names a


def test_init_mismatch_is_a_clear_error(videos, tmp_path):
    _source(tmp_path / "wide", seed=3, enc_width=32)
    with pytest.raises(ValueError, match=r"--init .*wide.*does not match preset 'tiny': enc_width 32 vs 64"):
        train_tokenizer(data=[str(videos)], out=tmp_path / "run", steps=1, init=tmp_path / "wide", **COMMON)
    Router(router_config("tiny")).save_pretrained(tmp_path / "router", preset="tiny")
    with pytest.raises(ValueError, match="is a 'router' model, not a tokenizer"):
        train_tokenizer(data=[str(videos)], out=tmp_path / "run", steps=1, init=tmp_path / "router", **COMMON)
    res = runner.invoke(
        app,
        [
            "train",
            "tokenizer",
            "--data",
            str(videos),
            "--out",
            str(tmp_path / "cli"),
            "--preset",
            "tiny",
            "--init",
            str(tmp_path / "missing"),
        ],
    )
    assert res.exit_code == 1 and "--init" in res.stderr and str(tmp_path / "missing") in res.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("step-*"))


def test_cli_passes_init(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(train_tok, "train_tokenizer", lambda **kw: seen.update(kw) or tmp_path)
    res = runner.invoke(
        app, ["train", "tokenizer", "--data", "v/", "--out", "o", "--preset", "tiny", "--init", "runs/demo", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    assert seen["init"] == Path("runs/demo") and seen["resume"] is False
