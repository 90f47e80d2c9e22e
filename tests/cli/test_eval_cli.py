"""`evatok eval recon|gen|curve|compare` through the Typer app: the exact library calls, real runs on
real footage with the tiny tokenizer / router / GPT and seeded random I3D and LPIPS (reports written,
fields present, values finite, protocol recorded), the gFVD real-statistics cache, refusing to
compare mismatched reports, and torchrun with 2 ranks giving the statistics of 1 process."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from evatok_cli.cli import app
from evatok_cli.evaluation.report import EvalReport
from evatok_cli.metrics import FeatureStats
from evatok_cli.models.gpt import GPT, gpt_config
from evatok_cli.models.router import Router, router_config

CHECKED_EVATOK = str(Path(__file__).resolve().parents[1] / "checked_evatok.py")  # torchrun entry: NCCL-safe collectives

runner = CliRunner()
RANDOM = ["--i3d", "random:0", "--lpips-weights", "random:1", "--lpips-net", "alex", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on 2 shared cores: one intra-op thread avoids oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reward_router(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("routers") / "reward"
    return Router(router_config("tiny", head="reward")).save_pretrained(
        path, preset="tiny", extra={"labels": {"w_q": 1.2, "w_l": 0.8}, "clip": {"fps": "native"}}
    )


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = gpt_config("tiny", codebook_size=1024, levels=(1, 2, 4, 8, 16), blocks=4, num_classes=2)
    return GPT(cfg).save_pretrained(tmp_path_factory.mktemp("gpt") / "gpt", preset="tiny")


# ------------------------------------------------------------------------------ exact calls
def test_eval_cli_calls_library_with_exact_kwargs(monkeypatch, tmp_path):
    calls = []
    fake = EvalReport(
        kind="recon",
        protocol={"name": "tiny"},
        standard=False,
        deviations=["x"],
        test_only=True,
        summary={"clips": 1},
        models={},
        metric_weights={},
        data={},
        settings={"metrics": ["psnr"]},
        seed=0,
    )

    def record(name):
        return lambda *a, **kw: calls.append((name, a, kw)) or fake

    monkeypatch.setattr("evatok_cli.evaluation.evaluate_reconstruction", record("recon"))
    monkeypatch.setattr("evatok_cli.evaluation.evaluate_generation", record("gen"))
    monkeypatch.setattr("evatok_cli.evaluation.evaluate_curve", record("curve"))
    res = runner.invoke(
        app,
        [
            "eval",
            "recon",
            "--tokenizer",
            "t",
            "--data",
            "a",
            "--data",
            "b",
            "--router",
            "r",
            "--w-q",
            "1.6",
            "--w-l",
            "0.4",
            "--metrics",
            "psnr, fvd",
            "--i3d",
            "i.pt",
            "--i3d-variant",
            "videogpt",
            "--lpips-weights",
            "v.pth",
            "--lpips-heads",
            "h.pth",
            "--lpips-net",
            "alex",
            "--protocol",
            "ucf-rfvd",
            "--num-clips",
            "5",
            "--clips",
            "all",
            "--save-stats",
            "st",
            "--batch-size",
            "3",
            "--workers",
            "1",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert calls == [
        (
            "recon",
            (Path("t"), ["a", "b"]),
            dict(
                protocol="ucf-rfvd",
                assignment=None,
                router=Path("r"),
                w_q=1.6,
                w_l=0.4,
                metrics=["psnr", "fvd"],
                i3d="i.pt",
                i3d_variant="videogpt",
                lpips_weights="v.pth",
                lpips_heads="h.pth",
                lpips_net="alex",
                num_clips=5,
                clips="all",
                batch_size=3,
                workers=1,
                device="cpu",
                stats_dir=Path("st"),
                stdin=None,
            ),
        )
    ]
    assert json.loads(res.stdout)["summary"] == {"clips": 1}
    calls.clear()
    res = runner.invoke(
        app,
        [
            "eval",
            "gen",
            "--gpt",
            "g",
            "--tokenizer",
            "t",
            "--real",
            "r1",
            "--protocol",
            "ucf-c2v-10k",
            "--i3d",
            "i.pt",
            "--num-samples",
            "7",
            "--num-clips",
            "9",
            "--cfg",
            "1.5",
            "--temperature",
            "0.9",
            "--top-k",
            "5",
            "--top-p",
            "0.8",
            "--seed",
            "3",
            "--cache-dir",
            "c",
            "--no-cache",
            "--no-ema",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert calls == [
        (
            "gen",
            (Path("g"), Path("t"), ["r1"]),
            dict(
                protocol="ucf-c2v-10k",
                i3d="i.pt",
                i3d_variant=None,
                num_samples=7,
                num_clips=9,
                cfg_scale=1.5,
                temperature=0.9,
                top_k=5,
                top_p=0.8,
                seed=3,
                batch_size=4,
                workers=0,
                device="cpu",
                ema=False,
                cache_dir=Path("c"),
                use_cache=False,
                prefix_assignment_spec=None,
                stdin=None,
            ),
        )
    ]
    calls.clear()
    res = runner.invoke(
        app,
        [
            "eval",
            "curve",
            "--tokenizer",
            "t",
            "--data",
            "a",
            "--router",
            "r",
            "--w-q",
            "0.8,1.6",
            "--metric",
            "psnr,lpips",
            "--lpips-weights",
            "random:1",
            "--device",
            "cpu",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert calls == [
        (
            "curve",
            (Path("t"), ["a"]),
            dict(
                router=Path("r"),
                w_q="0.8,1.6",
                budgets=None,
                targets=None,
                metrics=["psnr", "lpips"],
                protocol=None,
                i3d=None,
                i3d_variant=None,
                lpips_weights="random:1",
                lpips_heads=None,
                lpips_net="vgg",
                num_clips=None,
                clips=None,
                batch_size=8,
                workers=0,
                device="cpu",
                stdin=None,
            ),
        )
    ]
    for bad in (
        ["recon", "--tokenizer", "t", "--data", "a", "--router", "r", "--assignment", "uniform:4"],
        ["recon", "--tokenizer", "t", "--data", "a", "--batch-size", "0"],
        ["curve", "--tokenizer", "t", "--data", "a", "--w-q", "1", "--budgets", "4"],
        [
            "gen",
            "--gpt",
            "g",
            "--tokenizer",
            "t",
            "--real",
            "r",
            "--protocol",
            "tiny",
            "--i3d",
            "x",
            "--num-samples",
            "0",
        ],
    ):
        assert runner.invoke(app, ["eval", *bad]).exit_code == 2, bad


EVAL_SURFACE = {  # a new option is a decision: update docs/evaluation.md and this list together
    "recon": [
        "--assignment",
        "--batch-size",
        "--clips",
        "--data",
        "--device",
        "--i3d",
        "--i3d-variant",
        "--json",
        "--lpips-heads",
        "--lpips-net",
        "--lpips-weights",
        "--metrics",
        "--num-clips",
        "--out",
        "--protocol",
        "--quiet",
        "--router",
        "--save-stats",
        "--tokenizer",
        "--w-l",
        "--w-q",
        "--workers",
    ],
    "gen": [
        "--batch-size",
        "--cache-dir",
        "--cfg",
        "--device",
        "--gpt",
        "--i3d",
        "--i3d-variant",
        "--json",
        "--no-cache",
        "--no-ema",
        "--num-clips",
        "--num-samples",
        "--out",
        "--prefix-assignment",
        "--protocol",
        "--quiet",
        "--real",
        "--seed",
        "--temperature",
        "--tokenizer",
        "--top-k",
        "--top-p",
        "--workers",
    ],
    "curve": [
        "--batch-size",
        "--budgets",
        "--clips",
        "--data",
        "--device",
        "--i3d",
        "--i3d-variant",
        "--json",
        "--lpips-heads",
        "--lpips-net",
        "--lpips-weights",
        "--metric",
        "--num-clips",
        "--out",
        "--plot",
        "--protocol",
        "--quiet",
        "--router",
        "--targets",
        "--tokenizer",
        "--w-q",
        "--workers",
    ],
    "compare": ["--out"],
}


def test_no_new_eval_cli_options():
    import typer

    group = typer.main.get_command(app).commands["eval"]
    got = {
        name: sorted(o for p in c.params for o in p.opts if o.startswith("--")) for name, c in group.commands.items()
    }
    assert got == EVAL_SURFACE


def test_plot_without_matplotlib_is_a_clear_usage_error(monkeypatch):
    monkeypatch.setattr("evatok_cli.evaluation.matplotlib_available", lambda: False)
    res = runner.invoke(app, ["eval", "curve", "--tokenizer", "t", "--data", "a", "--plot", "c.png"])
    assert res.exit_code == 2 and "--plot needs matplotlib" in res.output and "evatok[plot]" in res.output


# --------------------------------------------------------------------------------- real runs
def test_eval_recon_on_real_footage(tiny_tokenizer, video_dir, footage, tmp_path):
    out = tmp_path / "rep" / "recon.json"
    res = runner.invoke(
        app,
        [
            "eval",
            "recon",
            "--tokenizer",
            str(tiny_tokenizer),
            "--data",
            str(video_dir),
            "--data",
            str(footage["bigbuckbunny"]),
            "--protocol",
            "tiny",
            "--clips",
            "2",
            "--metrics",
            "psnr,ssim,lpips,fvd",
            "-o",
            str(out),
            *RANDOM,
        ],
    )
    assert res.exit_code == 0, res.output
    assert "# evatok eval recon: protocol `tiny` (NON-STANDARD, TEST ONLY)" in res.stdout
    rep = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().strip() in res.stdout
    for key in (
        "kind",
        "protocol",
        "standard",
        "deviations",
        "test_only",
        "summary",
        "models",
        "metric_weights",
        "data",
        "settings",
        "seed",
        "fvd",
        "per_clip",
        "evatok_version",
        "created_utc",
        "format",
    ):
        assert key in rep, key
    assert rep["protocol"]["name"] == "tiny" and rep["protocol"]["clips_per_video"] == "2" and rep["test_only"]
    s = rep["summary"]
    assert s["clips"] == 6 == len(rep["per_clip"]) == rep["data"]["clips"]  # 2 clips x 3 videos
    for k in ("psnr", "ssim", "lpips", "fvd", "mean_tokens", "token_savings"):
        assert s[k] is not None and math.isfinite(s[k]), k
    assert s["mean_tokens"] == s["uniform_tokens"] == 64 and s["token_savings"] == 0  # default: uniform at max level
    assert all(
        set(c) >= {"key", "source", "clip_start", "assignment", "tokens", "psnr", "ssim", "lpips"}
        for c in rep["per_clip"]
    )
    assert len(rep["models"]["tokenizer"]["sha256"]) == 64 and rep["metric_weights"]["i3d"]["variant"] == "videogpt"
    assert rep["fvd"]["n_real"] == rep["fvd"]["n_fake"] == 6 and rep["data"]["listing_sha256"]


def test_eval_curve_with_a_router_and_plot(tiny_tokenizer, reward_router, video_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "curve.json", tmp_path / "curve.png"
    res = runner.invoke(
        app,
        [
            "eval",
            "curve",
            "--tokenizer",
            str(tiny_tokenizer),
            "--data",
            str(video_dir),
            "--router",
            str(reward_router),
            "--w-q",
            "0.4,1.2,2.0",
            "--metric",
            "psnr,fvd",
            "--clips",
            "2",
            "-o",
            str(out),
            "--plot",
            str(png),
            *RANDOM,
        ],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    labels = [p["label"] for p in rep["points"]]
    assert labels == [
        "uniform-1",
        "uniform-2",
        "uniform-4",
        "uniform-8",
        "uniform-16",
        "router-wq-0.4",
        "router-wq-1.2",
        "router-wq-2",
    ]
    for p in rep["points"]:
        assert p["clips"] == 4 and math.isfinite(p["psnr"]) and math.isfinite(p["fvd"])
        if p["kind"] == "uniform":
            assert p["mean_tokens"] == 4 * p["params"]["k"]
        else:
            assert p["params"]["w_l"] == pytest.approx(2 - p["params"]["w_q"]) and "savings_at_equal_quality" in p
    router_tokens = [p["mean_tokens"] for p in rep["points"] if p["kind"] == "router"]
    assert router_tokens == sorted(router_tokens)  # more weight on quality never buys fewer tokens
    assert "| uniform-16 | 64.00 | 0.0% |" in res.stdout and rep["protocol"]["name"] == "custom"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = runner.invoke(
        app,
        [
            "eval",
            "curve",
            "--tokenizer",
            str(tiny_tokenizer),
            "--data",
            str(video_dir),
            "--router",
            str(reward_router),
            "--budgets",
            "10,40",
            "--clips",
            "2",
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    pts = {p["label"]: p for p in json.loads(res.stdout)["points"]}
    assert pts["router-budget-10"]["mean_tokens"] <= 10 and pts["router-budget-40"]["mean_tokens"] <= 40


def test_eval_gen_caches_real_stats(tiny_gpt, tiny_tokenizer, video_dir, tmp_path):
    args = [
        "eval",
        "gen",
        "--gpt",
        str(tiny_gpt),
        "--tokenizer",
        str(tiny_tokenizer),
        "--real",
        str(video_dir),
        "--protocol",
        "tiny",
        "--i3d",
        "random:0",
        "--num-samples",
        "2",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--device",
        "cpu",
        "--json",
    ]
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "g.json")])
    assert first.exit_code == 0, first.output
    a = json.loads(first.stdout)
    assert a["kind"] == "gen" and a["protocol"]["name"] == "tiny" and math.isfinite(a["summary"]["fvd"])
    assert a["summary"]["samples"] == 2 and a["fvd"]["n_fake"] == 2 and a["models"]["gpt"]["sha256"]
    assert a["data"]["real_stats_cache"]["hit"] is False and Path(a["data"]["real_stats_cache"]["path"]).is_file()
    second = runner.invoke(app, args)
    b = json.loads(second.stdout)
    assert b["data"]["real_stats_cache"]["hit"] is True and b["summary"]["fvd"] == pytest.approx(a["summary"]["fvd"])
    res = runner.invoke(app, [*args[:9], "k600-fp-50k", *args[10:]])  # the paper's geometry, not tiny's
    assert res.exit_code == 1 and "16x128x128" in res.output


def test_eval_gen_frame_prediction_end_to_end(tiny_gpt, tiny_tokenizer, video_dir, tmp_path):
    """`eval gen --protocol tiny-fp` (k600-fp-50k at the tiny geometry) on real footage, random I3D."""
    args = ["eval", "gen", "--gpt", str(tiny_gpt), "--tokenizer", str(tiny_tokenizer), "--real", str(video_dir)]
    args += ["--protocol", "tiny-fp", "--i3d", "random:0", "--num-samples", "3", "--batch-size", "2"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--json"]
    res = runner.invoke(app, [*args, "--prefix-assignment", "max", "-o", str(tmp_path / "fp.json")])
    assert res.exit_code == 0, res.output
    a = json.loads(res.stdout)
    assert a["kind"] == "gen" and a["protocol"]["task"] == "frame-prediction" and math.isfinite(a["summary"]["fvd"])
    assert a["fvd"]["n_fake"] == 3 and a["fvd"]["n_real"] == 2 and a["settings"]["cfg_scale"] == 1.0
    assert a["settings"]["prefix"]["assignment"] == [16, 16] and a["settings"]["prefix"]["padded_to"] == 4
    assert all(s["block_lengths"][:2] == [16, 16] and s["tokens"] == sum(s["block_lengths"]) for s in a["samples"])
    assert json.loads((tmp_path / "fp.json").read_text())["summary"]["fvd"] == a["summary"]["fvd"]


def test_eval_compare_refuses_mismatched_reports(tiny_tokenizer, video_dir, tmp_path):
    base = [
        "eval",
        "recon",
        "--tokenizer",
        str(tiny_tokenizer),
        "--data",
        str(video_dir),
        "--protocol",
        "tiny",
        "--metrics",
        "psnr,fvd",
        "--device",
        "cpu",
        "-q",
    ]
    assert runner.invoke(app, [*base, "--i3d", "random:0", "-o", str(tmp_path / "a.json")]).exit_code == 0
    assert (
        runner.invoke(
            app, [*base, "--i3d", "random:0", "--assignment", "uniform:4", "-o", str(tmp_path / "b.json")]
        ).exit_code
        == 0
    )
    assert runner.invoke(app, [*base, "--i3d", "random:7", "-o", str(tmp_path / "c.json")]).exit_code == 0
    assert (
        runner.invoke(app, [*base, "--i3d", "random:0", "--num-clips", "1", "-o", str(tmp_path / "d.json")]).exit_code
        == 0
    )
    res = runner.invoke(app, ["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    assert "| mean tokens | 64.00 | 16.00 | -48.00 |" in res.stdout and "| a | b | b - a |" in res.stdout
    for other, why in (("c.json", "different I3D weights"), ("d.json", "different protocols")):
        res = runner.invoke(app, ["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / other)])
        assert res.exit_code == 1 and why in res.output and len(res.output.strip().splitlines()) == 1, res.output
    res = runner.invoke(app, ["eval", "compare", str(tmp_path / "a.json"), str(tmp_path / "missing.json")])
    assert res.exit_code == 1 and "no such report" in res.output


# ----------------------------------------------------------------------------------- torchrun
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_statistics_of_one(tiny_tokenizer, video_dir, footage, tmp_path):
    def run(prefix: list[str] | None, name: str) -> dict:
        args = [
            "eval",
            "recon",
            "--tokenizer",
            str(tiny_tokenizer),
            "--data",
            str(video_dir),
            "--data",
            str(footage["bigbuckbunny"]),
            "--protocol",
            "tiny",
            "--clips",
            "2",
            "--metrics",
            "psnr,fvd",
            "--i3d",
            "random:0",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--save-stats",
            str(tmp_path / name),
            "-o",
            str(tmp_path / f"{name}.json"),
            "-q",
        ]
        if prefix is None:  # one process: in this one
            res = runner.invoke(app, args)
            assert res.exit_code == 0, res.output
        else:
            res = subprocess.run(
                [*prefix, CHECKED_EVATOK, *args],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                timeout=300,
            )
            assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((tmp_path / f"{name}.json").read_text())

    one = run(None, "one")
    two = run(
        [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port", str(_free_port())],
        "two",
    )
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert [c["key"] for c in one["per_clip"]] == [c["key"] for c in two["per_clip"]]  # same clips, same order
    for a, b in zip(one["per_clip"], two["per_clip"]):
        assert a["assignment"] == b["assignment"] and a["psnr"] == pytest.approx(b["psnr"], rel=1e-5)
    for f in ("real", "recon"):
        s1, s2 = (FeatureStats.load(tmp_path / n / f"{f}.safetensors") for n in ("one", "two"))
        assert s1.count == s2.count == 6 and s1.meta == s2.meta
        torch.testing.assert_close(s2.sum, s1.sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s2.outer, s1.outer, rtol=1e-5, atol=1e-5)
    assert two["summary"]["fvd"] == pytest.approx(one["summary"]["fvd"], rel=1e-4)


@pytest.mark.slow
def test_torchrun_gen_samples_and_cache_do_not_depend_on_ranks(tiny_gpt, tiny_tokenizer, video_dir, tmp_path):
    def run(prefix: list[str] | None, cache: str, name: str) -> dict:
        args = [
            "eval",
            "gen",
            "--gpt",
            str(tiny_gpt),
            "--tokenizer",
            str(tiny_tokenizer),
            "--real",
            str(video_dir),
            "--protocol",
            "tiny",
            "--i3d",
            "random:0",
            "--num-samples",
            "4",
            "--batch-size",
            "1",
            "--cache-dir",
            str(tmp_path / cache),
            "--device",
            "cpu",
            "-o",
            str(tmp_path / f"{name}.json"),
            "-q",
        ]
        if prefix is None:  # one process: in this one
            res = runner.invoke(app, args)
            assert res.exit_code == 0, res.output
        else:
            res = subprocess.run(
                [*prefix, CHECKED_EVATOK, *args],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                timeout=300,
            )
            assert res.returncode == 0, res.stderr[-3000:]
        return json.loads((tmp_path / f"{name}.json").read_text())

    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2"]
    one = run(None, "c1", "one")
    two = run([*torchrun, "--master_port", str(_free_port())], "c2", "two")  # real statistics split over ranks
    hit = run([*torchrun, "--master_port", str(_free_port())], "c2", "hit")  # rank 0 reads the cache
    assert [
        one["data"]["real_stats_cache"]["hit"],
        two["data"]["real_stats_cache"]["hit"],
        hit["data"]["real_stats_cache"]["hit"],
    ] == [False, False, True]
    assert one["samples"] == two["samples"] == hit["samples"] and [s["class"] for s in one["samples"]] == [0, 1, 0, 1]
    s1, s2 = (
        FeatureStats.load(one["data"]["real_stats_cache"]["path"]),
        FeatureStats.load(two["data"]["real_stats_cache"]["path"]),
    )
    assert s1.count == s2.count == 2
    torch.testing.assert_close(s2.outer, s1.outer, rtol=1e-5, atol=1e-5)
    assert two["world_size"] == 2 and two["summary"]["fvd"] == pytest.approx(one["summary"]["fvd"], rel=1e-4)
    assert hit["summary"]["fvd"] == pytest.approx(two["summary"]["fvd"], rel=1e-9)


def test_torchrun_frame_prediction_does_not_depend_on_ranks(tiny_gpt, tiny_tokenizer, video_dir, tmp_path):
    """tiny-fp under torchrun (2 ranks): each rank encodes the condition clips of its own chunks; same report."""
    args = ["eval", "gen", "--gpt", str(tiny_gpt), "--tokenizer", str(tiny_tokenizer), "--real", str(video_dir)]
    args += ["--protocol", "tiny-fp", "--i3d", "random:0", "--num-samples", "4", "--batch-size", "1", "--device", "cpu"]
    res = runner.invoke(app, [*args, "--cache-dir", str(tmp_path / "c1"), "-o", str(tmp_path / "one.json"), "-q"])
    assert res.exit_code == 0, res.output
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_port"]
    two = [*args, "--cache-dir", str(tmp_path / "c2"), "-o", str(tmp_path / "two.json"), "-q"]
    res = subprocess.run([*torchrun, str(_free_port()), CHECKED_EVATOK, *two], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert two["world_size"] == 2 and one["samples"] == two["samples"]
    assert all(s["block_lengths"][:2] == [16, 4] for s in two["samples"])
    assert two["summary"]["fvd"] == pytest.approx(one["summary"]["fvd"], rel=1e-4)
