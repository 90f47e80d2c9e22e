"""The shipped demo models (docs/models.md): export to float16, the ship script, the defaults used when
``--tokenizer`` / ``--router`` / ``--gpt`` are omitted, the missing-model error, ``evatok info --models``.

The real demo models are trained elsewhere; here ``EVATOK_DEMO_MODELS`` points at tiny seeded
random-weight models that ``examples/ship_demo_models.py`` exports from a fake run directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from evatok_cli.checkpoint import (
    WEIGHTS_NAME,
    CheckpointError,
    export_model,
    load_model,
    read_model_meta,
    register_model_kind,
    save_model,
    weights_sha256,
)
from evatok_cli.cli import app
from evatok_cli.demo import ENV_VAR, DemoModelError, demo_model_dir, demo_models
from evatok_cli.encode import EncodeSummary
from evatok_cli.models.gpt import GPT, gpt_config
from evatok_cli.models.router import Router, router_config
from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
from evatok_cli.store import open_store
from evatok_cli.train.checkpoints import write_state

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
LEVELS = (1, 2, 4, 8, 16)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is much faster than two on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ship_module():
    spec = importlib.util.spec_from_file_location("ship_demo_models", ROOT / "examples" / "ship_demo_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A fake pipeline run: final-router/ (a training output with an EMA), router/, gpt-router/."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    tok = EVATokTokenizer(tokenizer_config("tiny"))
    ema = {k: v + 0.02 * torch.randn_like(v) for k, v in tok.state_dict().items()}  # EMA != raw weights
    step = d / "final-router" / "step-00000007"
    save_model(
        step,
        tok,
        tok.config,
        kind="tokenizer",
        preset="tiny",
        ema=ema,
        extra={"stage": "final", "assignment": "router:runs/router", "clip_fps": "native", "seed": 0},
    )
    write_state(step, {"step": 7, "steps_total": 8})
    torch.manual_seed(1)
    router = Router(router_config("tiny"))
    torch.nn.init.normal_(router.head.weight, std=0.5)  # a non-degenerate argmax
    router.save_pretrained(
        d / "router", preset="tiny", extra={"labels": {"w_q": 1.2, "w_l": 0.8}, "clip": {"fps": "native"}}
    )
    torch.manual_seed(2)
    gpt = GPT(gpt_config("tiny", codebook_size=1024, levels=LEVELS, blocks=4, num_classes=2))
    save_model(
        d / "gpt-router",
        gpt,
        gpt.config,
        kind="gpt",
        preset="tiny",
        extra={
            "space": {"levels": list(LEVELS), "blocks": 4},
            "codebook_size": 1024,
            "class_names": ["ride", "talk"],
            "tokenizer": {"config": read_model_meta(step)["config"], "preset": "tiny", "sha256": weights_sha256(step)},
            "clip": {"frames": 8, "height": 32, "width": 32, "fps": "native"},
            "data": {"samples": 4},
        },
    )
    return d


@pytest.fixture(scope="module")
def demo_dir(run_dir, tmp_path_factory) -> Path:
    """The fake run shipped by examples/ship_demo_models.py (in-process) into a temporary directory."""
    dest = tmp_path_factory.mktemp("demo") / "models"
    _ship_module().ship(
        run_dir,
        dest,
        cards={"all": {"trained_on": "seeded random weights (tests)"}, "tokenizer": {"quality": {"psnr": 9.9}}},
        max_mb=30,
    )
    return dest


@pytest.fixture
def demo_env(demo_dir, monkeypatch) -> Path:
    monkeypatch.setenv(ENV_VAR, str(demo_dir))
    return demo_dir


def _dtypes(path: Path) -> set[torch.dtype]:
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


# ---------------------------------------------------------------------------------- export
def test_export_round_trip_fp16_ema_and_close_outputs(run_dir, tmp_path):
    src = run_dir / "final-router" / "step-00000007"
    out = export_model(run_dir / "final-router", tmp_path / "tok", card={"trained_on": "x"})  # a run dir: latest step
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS_NAME]  # no EMA, no train state
    assert _dtypes(out) == {torch.float16}
    assert (out / WEIGHTS_NAME).stat().st_size < 0.55 * (src / WEIGHTS_NAME).stat().st_size
    meta = read_model_meta(out)
    assert meta["card"] == {"trained_on": "x"} and meta["preset"] == "tiny" and meta["stage"] == "final"
    assert meta["exported_from"] == {
        "source": "final-router/step-00000007",
        "sha256": weights_sha256(src),
        "weights": "ema",
        "dtype": "float16",
        "evatok_version": meta["evatok_version"],
    }

    ref, got = load_model(src, ema=True), load_model(out)
    assert all(p.dtype == torch.float32 for p in got.parameters())
    raw = load_model(src, ema=False)
    key = next(iter(ref.state_dict()))
    # the EMA weights were exported, not the raw ones
    assert torch.allclose(got.state_dict()[key], ref.state_dict()[key], rtol=1e-3, atol=1e-4)
    assert not torch.allclose(got.state_dict()[key], raw.state_dict()[key], rtol=1e-3, atol=1e-4)
    torch.manual_seed(5)
    video = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    a = torch.tensor([[16, 8, 4, 1], [2, 2, 16, 16]])
    with torch.no_grad():
        tok_ref, bl = ref.encode(video, a)
        tok_got, _ = got.encode(video, a)
        same = torch.cat([(x == y).float() for x, y in zip(tok_ref, tok_got)]).mean()
        assert same > 0.9  # fp16 rounding may flip a near-tie code or two
        diff = (ref.decode(tok_ref, bl) - got.decode(tok_ref, bl)).abs().max()
    assert diff < 2e-2, diff


def test_export_router_and_gpt_outputs_close(run_dir, demo_dir):
    torch.manual_seed(6)
    video = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    r_ref, r_got = Router.from_pretrained(run_dir / "router"), Router.from_pretrained(demo_dir / "router")
    assert _dtypes(demo_dir / "router") == {torch.float16}
    assert torch.allclose(r_ref.predict(video), r_got.predict(video), atol=2e-2, rtol=1e-2)
    g_ref, g_got = GPT.from_pretrained(run_dir / "gpt-router"), GPT.from_pretrained(demo_dir / "gpt")
    idx = torch.randint(0, 1024, (2, 12))
    with torch.no_grad():
        assert torch.allclose(g_ref(idx)[0], g_got(idx)[0], atol=2e-2, rtol=1e-2)


class _IntBuffer(torch.nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.w = torch.nn.Parameter(torch.randn(4, 4))
        self.register_buffer("count", torch.tensor([3, 70000, -5], dtype=torch.int64))


def test_export_keeps_integer_buffers_and_refuses_overflow(tmp_path):
    from dataclasses import dataclass

    @dataclass(kw_only=True)
    class Cfg:
        n: int = 4

    register_model_kind("test-int-buffer", Cfg)(_IntBuffer)
    m = _IntBuffer(Cfg())
    save_model(tmp_path / "src", m, m.config, kind="test-int-buffer")
    out = export_model(tmp_path / "src", tmp_path / "dst")
    with safe_open(str(out / WEIGHTS_NAME), framework="pt") as f:
        assert f.get_tensor("w").dtype == torch.float16
        assert f.get_tensor("count").dtype == torch.int64 and f.get_tensor("count").tolist() == [3, 70000, -5]
    m.w.data[0, 0] = 1e6  # beyond float16's 65504
    save_model(tmp_path / "big", m, m.config, kind="test-int-buffer")
    with pytest.raises(CheckpointError, match="overflows float16"):
        export_model(tmp_path / "big", tmp_path / "dst2")
    with pytest.raises(ValueError, match="floating dtype"):
        export_model(tmp_path / "src", tmp_path / "dst3", dtype=torch.int8)


def test_gpt_export_is_pointed_at_the_exported_tokenizer(run_dir, demo_dir, tmp_path):
    tok = read_model_meta(demo_dir / "gpt")["tokenizer"]
    assert tok["sha256"] == weights_sha256(demo_dir / "tokenizer")
    assert tok["source_sha256"] == weights_sha256(run_dir / "final-router" / "step-00000007")
    torch.manual_seed(9)  # a tokenizer export from other weights: the GPT was not trained on its tokens
    other = EVATokTokenizer(tokenizer_config("tiny")).save_pretrained(tmp_path / "other", preset="tiny")
    export_model(other, tmp_path / "other-export")
    with pytest.raises(CheckpointError, match="was trained on tokens of tokenizer weights"):
        export_model(run_dir / "gpt-router", tmp_path / "gpt", tokenizer=tmp_path / "other-export")


def test_ship_script_cards_sizes_and_limit(run_dir, demo_env, tmp_path):
    demo_dir = demo_env
    recs = {r["kind"]: r for r in demo_models()}
    assert list(recs) == ["tokenizer", "router", "gpt"]
    assert recs["tokenizer"]["card"] == {
        "steps": 8,
        "resolution": "8x32x32",
        "levels": list(LEVELS),
        "stage": "final",
        "assignment": "router:runs/router",
        "clip_fps": "native",
        "trained_on": "seeded random weights (tests)",
        "quality": {"psnr": 9.9},
    }
    assert recs["gpt"]["card"]["classes"] == ["ride", "talk"] and recs["router"]["card"]["head"] == "classify"
    assert not list(demo_dir.glob(".staging-*"))
    # over the limit: a real subprocess, exit 1, nothing moved
    dest = tmp_path / "models"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "ship_demo_models.py"),
            str(run_dir),
            "--dest",
            str(dest),
            "--max-mb",
            "0.1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 1, res.stderr
    assert "over the 0.1 MB limit" in res.stderr and "total" in res.stdout
    assert not any(dest.iterdir())


# ---------------------------------------------------------------------------------- defaults
def test_missing_demo_model_is_a_clear_one_line_error(tmp_path, monkeypatch, video_dir):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "none"))
    with pytest.raises(DemoModelError, match="--tokenizer DIR"):
        demo_model_dir("tokenizer")
    res = runner.invoke(app, ["encode", str(video_dir), "-o", str(tmp_path / "t.zarr")])
    assert res.exit_code == 1
    line = res.stderr.strip()
    assert "\n" not in line and line.startswith("evatok: error: no demo tokenizer is shipped")
    assert str(tmp_path / "none" / "tokenizer") in line and "--tokenizer DIR" in line
    res = runner.invoke(app, ["generate", "-o", str(tmp_path / "g"), "--tokenizer", str(tmp_path)])
    assert res.exit_code == 1 and "no demo gpt is shipped" in res.stderr and "--gpt DIR" in res.stderr


def test_encode_uses_demo_tokenizer_and_router_when_omitted(demo_env, monkeypatch, tmp_path):
    calls = []

    def fake(inputs, out, **kw):
        calls.append(kw)
        return EncodeSummary(out=str(out))

    monkeypatch.setattr("evatok_cli.encode.encode_videos", fake)
    res = runner.invoke(app, ["encode", "v/", "-o", str(tmp_path / "t.zarr")])
    assert res.exit_code == 0, res.output
    assert calls[-1]["tokenizer"] == demo_env / "tokenizer" and calls[-1]["router"] == demo_env / "router"
    assert "using the shipped demo tokenizer and router" in res.stderr and "--tokenizer/--router DIR" in res.stderr
    # a policy given: the demo tokenizer only
    for extra in (["--assignment", "uniform:4"], ["--labels-store", "l.zarr"], ["--router", "my-router"]):
        res = runner.invoke(app, ["encode", "v/", "-o", str(tmp_path / "t.zarr"), *extra])
        assert res.exit_code == 0 and calls[-1]["tokenizer"] == demo_env / "tokenizer"
        assert calls[-1]["router"] == (Path("my-router") if extra[0] == "--router" else None)
        assert "using the shipped demo tokenizer (" in res.stderr
    # your own tokenizer: no demo model, no line
    res = runner.invoke(app, ["encode", "v/", "-o", str(tmp_path / "t.zarr"), "--tokenizer", "mine"])
    assert calls[-1]["tokenizer"] == Path("mine") and calls[-1]["router"] is None and "shipped" not in res.stderr
    # --quiet: no line
    res = runner.invoke(app, ["encode", "v/", "-o", str(tmp_path / "t.zarr"), "--quiet"])
    assert calls[-1]["router"] == demo_env / "router" and "shipped" not in res.stderr


def test_encode_without_a_demo_router_falls_back_to_the_default_assignment(demo_dir, monkeypatch, tmp_path):
    only_tok = tmp_path / "models"
    only_tok.mkdir()
    (only_tok / "tokenizer").symlink_to(demo_dir / "tokenizer")
    monkeypatch.setenv(ENV_VAR, str(only_tok))
    calls = []
    monkeypatch.setattr(
        "evatok_cli.encode.encode_videos", lambda inputs, out, **kw: calls.append(kw) or EncodeSummary(out=str(out))
    )
    res = runner.invoke(app, ["encode", "v/", "-o", str(tmp_path / "t.zarr")])
    assert res.exit_code == 0, res.output
    assert calls[-1]["router"] is None and "no demo router is shipped" in res.stderr


def test_decode_generate_eval_use_the_demo_models(demo_env, monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("evatok_cli.decode.decode_store", lambda store, out, **kw: seen.update(decode=kw) or _Obj())
    # a store the demo tokenizer wrote (store_tokenizer checks the recorded sha256: tests below)
    monkeypatch.setattr("evatok_cli.decode.store_tokenizer", lambda store: demo_env / "tokenizer")
    monkeypatch.setattr(
        "evatok_cli.generate.generate_videos", lambda gpt, out, **kw: seen.update(gen=(gpt, kw)) or _Obj()
    )
    monkeypatch.setattr(
        "evatok_cli.evaluation.evaluate_reconstruction", lambda tok, data, **kw: seen.update(recon=tok) or _Obj()
    )
    monkeypatch.setattr("evatok_cli.cli.eval._emit", lambda *a, **k: None)
    assert runner.invoke(app, ["decode", "s.zarr", "-o", str(tmp_path / "r"), "--quiet"]).exit_code == 0
    assert seen["decode"]["tokenizer"] == demo_env / "tokenizer"
    runner.invoke(app, ["generate", "-o", str(tmp_path / "g"), "--quiet"])
    assert seen["gen"][0] == demo_env / "gpt" and seen["gen"][1]["tokenizer"] == demo_env / "tokenizer"
    res = runner.invoke(app, ["eval", "recon", "--data", "v/"])
    assert res.exit_code == 0, res.output
    assert seen["recon"] == demo_env / "tokenizer" and "using the shipped demo tokenizer" in res.stderr


def test_route_without_router_uses_the_demo_router(demo_env, footage):
    res = runner.invoke(app, ["route", "--data", str(footage["carphone"]), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "using the shipped demo router" in res.stderr
    rec = json.loads(res.stdout.splitlines()[0])
    assert rec["clip_start"] == 0 and len(rec["assignment"]) == 4


class _Obj:
    """A summary stand-in: every attribute is empty."""

    def __getattr__(self, name):
        return [] if name in ("per_clip", "source_failures", "files", "per_sample") else 0

    def to_dict(self):
        return {}


def test_real_encode_decode_generate_with_only_the_demo_models(demo_env, video_dir, tiny_tokenizer, tmp_path):
    """`evatok encode VIDEOS -o tokens.zarr` right after install: a real subprocess of the console script."""
    demo_dir = demo_env
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    store = tmp_path / "tokens.zarr"
    evatok = Path(sys.executable).parent / "evatok"
    res = subprocess.run(
        [str(evatok), "encode", str(video_dir), "-o", str(store), "--clips", "2", "--workers", "0"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "using the shipped demo tokenizer and router" in res.stderr
    s = open_store(store)
    assert len(s) == 4 and s.attrs["tokenizer"]["sha256"] == weights_sha256(demo_dir / "tokenizer")
    assert s.attrs["assignment_policy"] == {"router": str(demo_dir / "router")}

    res = runner.invoke(app, ["decode", str(store), "-o", str(tmp_path / "recon"), "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "recon").glob("*.mp4"))) == 2
    # a store of another tokenizer: the sha256 check still refuses the demo tokenizer, and says what to do
    other = tmp_path / "other.zarr"
    assert (
        runner.invoke(
            app,
            [
                "encode",
                str(video_dir),
                "-o",
                str(other),
                "--tokenizer",
                str(tiny_tokenizer),
                "--clips",
                "first",
                "--workers",
                "0",
                "--quiet",
            ],
        ).exit_code
        == 0
    )
    res = runner.invoke(
        app, ["decode", str(other), "-o", str(tmp_path / "r2"), "--tokenizer", str(demo_dir / "tokenizer")]
    )
    assert res.exit_code == 1
    assert "not the tokenizer that wrote" in res.stderr
    # without --tokenizer: the tokenizer directory the store records, while it exists unchanged...
    res = runner.invoke(app, ["decode", str(other), "-o", str(tmp_path / "r2"), "--limit", "1"])
    assert res.exit_code == 0, res.output
    assert f"using the tokenizer that wrote {other}: {tiny_tokenizer}" in " ".join(res.stderr.split())
    # ...and once it is gone, a clear error naming it (the demo tokenizer did not write this store)
    gone_tok = tmp_path / "gone-tok"
    shutil.copytree(tiny_tokenizer, gone_tok)
    gone = tmp_path / "gone.zarr"
    assert (
        runner.invoke(
            app,
            [
                "encode",
                str(video_dir),
                "-o",
                str(gone),
                "--tokenizer",
                str(gone_tok),
                "--clips",
                "first",
                "--workers",
                "0",
                "--quiet",
            ],
        ).exit_code
        == 0
    )
    shutil.rmtree(gone_tok)
    res = runner.invoke(app, ["decode", str(gone), "-o", str(tmp_path / "r3")])
    assert res.exit_code == 1
    msg = " ".join(res.stderr.split())
    assert f"was written by the tokenizer at {gone_tok}, which is gone" in msg
    assert "pass the tokenizer that wrote it with --tokenizer DIR" in msg
    res = runner.invoke(
        app, ["generate", "-o", str(tmp_path / "gen"), "--classes", "ride", "--device", "cpu", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert [Path(f).name for f in json.loads(res.stdout)["files"]] == ["class-ride_0.mp4"]
    res = runner.invoke(
        app,
        ["generate", "-o", str(tmp_path / "gen2"), "--gpt", str(demo_dir / "gpt"), "--tokenizer", str(tiny_tokenizer)],
    )
    assert res.exit_code == 1 and "not the tokenizer" in res.stderr and "omitted" not in res.stderr
    # your own GPT without --tokenizer: the demo tokenizer is refused, with the hint
    gpt2 = tmp_path / "gpt2"
    meta = read_model_meta(demo_dir / "gpt")
    save_model(
        gpt2,
        GPT.from_pretrained(demo_dir / "gpt"),
        GPT.from_pretrained(demo_dir / "gpt").config,
        kind="gpt",
        preset="tiny",
        extra={
            **{k: meta[k] for k in ("space", "codebook_size", "class_names", "clip")},
            "tokenizer": {"sha256": weights_sha256(tiny_tokenizer)},
        },
    )
    res = runner.invoke(app, ["generate", "-o", str(tmp_path / "gen3"), "--gpt", str(gpt2)])
    assert res.exit_code == 1 and "not the tokenizer" in res.stderr
    assert "--tokenizer was omitted, so the shipped demo tokenizer was used" in res.stderr


# ---------------------------------------------------------------------------------- info --models
def test_info_models_table_and_json(demo_env, demo_dir, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps long cells to the terminal width
    res = runner.invoke(app, ["info", "--models"])
    assert res.exit_code == 0, res.output
    sha = weights_sha256(demo_dir / "tokenizer")
    for text in ("tokenizer", "router", "gpt", "tiny", sha, "seeded random weights (tests)", "psnr"):
        assert text in res.stdout
    res = runner.invoke(app, ["info", "--models", "--json"])
    obj = json.loads(res.stdout)
    assert obj["dir"] == str(demo_dir) and [m["kind"] for m in obj["models"]] == ["tokenizer", "router", "gpt"]
    tok = obj["models"][0]
    assert tok["sha256"] == sha and tok["dtype"] == "float16" and tok["preset"] == "tiny"
    assert tok["parameters"] == EVATokTokenizer(tokenizer_config("tiny")).num_parameters()
    assert tok["bytes"] == sum(f.stat().st_size for f in (demo_dir / "tokenizer").iterdir())


def test_info_models_none_shipped(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    res = runner.invoke(app, ["info", "--models"])
    assert res.exit_code == 0 and "no demo models are shipped in" in res.stderr and str(tmp_path) in res.stderr
    res = subprocess.run(
        [sys.executable, "-m", "evatok_cli", "info", "--models", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, ENV_VAR: str(tmp_path)},
        timeout=120,
    )
    assert res.returncode == 0 and json.loads(res.stdout) == {"dir": str(tmp_path), "models": []}
    assert runner.invoke(app, ["info"]).exit_code == 2
