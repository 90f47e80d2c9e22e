"""Routing policies, budgets, evaluation against labels stores, and the ``evatok route`` command.

Also home of :func:`make_labels_store`, which writes a labels store in the format of ``evatok search``
(token store v1 + ``kind: labels`` + ``search`` attrs + ``metric``/``reward`` fields) from real
footage clips and a synthetic but structured metric, so these tests do not depend on the search code.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from evatok_cli.assign import RouterPolicy, budget_assignments, choose_assignments, routing_scores
from evatok_cli.assignments import AssignmentSpace
from evatok_cli.cli import app
from evatok_cli.config import config_to_dict
from evatok_cli.labels import load_labels, resolve_sources
from evatok_cli.models.router import Router, router_config
from evatok_cli.models.tokenizer import tokenizer_config
from evatok_cli.route import evaluate, route
from evatok_cli.store import Sample, open_writer
from evatok_cli.video import ClipSpec, VideoRef, clip_key, list_inputs, read_clips, to_model_input

CHECKED_EVATOK = str(Path(__file__).resolve().parents[0] / "checked_evatok.py")  # torchrun entry: NCCL-safe collectives

W_Q, W_L = 1.2, 0.8


# ------------------------------------------------------------------------------ labels builder
def clip_difficulty(frames: np.ndarray, blocks: int) -> np.ndarray:
    """(T,) per-block difficulty of a uint8 (F, H, W, 3) clip.

    Like the paper's observations (supplementary I): the first block carries the spatial detail, a
    later block mostly its motion (a block repeating earlier frames is easy).
    """
    x = frames.astype(np.float64).mean(-1) / 255.0  # (F, H, W)
    spatial = np.abs(np.diff(x, axis=1)).mean((1, 2)) + np.abs(np.diff(x, axis=2)).mean((1, 2))  # (F,)
    motion = np.concatenate([[0.0], np.abs(np.diff(x, axis=0)).mean((1, 2))])  # (F,) change from the previous frame
    spatial, motion = spatial.reshape(blocks, -1).mean(1), motion.reshape(blocks, -1).mean(1)
    d = 0.1 * spatial + 4 * motion
    d[0] = spatial[0] + motion[0]
    return d


def make_labels_store(
    path: Path,
    videos: list[Path | str],
    *,
    clips_per_video: int = 4,
    seed: int = 0,
    extra_sources: tuple[str, ...] = (),
    nan_frac: float = 0.0,
    calibration: tuple[float, float] | None = None,
) -> Path:
    """A labels store over the tiny tokenizer's space (levels 1..16, 4 blocks) and 8x32x32 clips.

    metric (LPIPS-like, lower is better) of assignment a = mean_t d_t * k_t^-0.6 + noise, with d_t the
    clip's per-block difficulty; the best index / reward / tokens follow PAPER Eq. 3-7.
    ``extra_sources`` adds one fake clip per (nonexistent) source; ``calibration`` (mean, std) replaces
    the store's own (a later batch searched with ``--stats``).
    """
    tcfg = tokenizer_config("tiny")
    space = tcfg.space
    spec = ClipSpec(frames=tcfg.frames, height=tcfg.height, width=tcfg.width)
    rng = np.random.default_rng(seed)
    rows: list[tuple[str, int, np.ndarray]] = []
    for ref in list_inputs([str(v) for v in videos]):
        for clip in read_clips(ref, spec, policy=clips_per_video):
            rows.append((clip.source, clip.start, clip_difficulty(clip.frames, space.blocks)))
    for s in extra_sources:
        rows.append((s, 0, np.full(space.blocks, 0.1)))
    table = space.table().astype(np.float64)  # (M, T)
    metric = np.stack([(d[None, :] * table**-0.6).mean(1) for _, _, d in rows])  # (N, M)
    metric += rng.normal(0, 0.002, metric.shape)
    mean, std = (float(metric.mean()), float(metric.std())) if calibration is None else calibration
    if nan_frac:
        metric[rng.random(metric.shape) < nan_frac] = np.nan
    reward = W_Q * -(metric - mean) / std - W_L * space.lengths_z()[None, :]
    best = np.argmax(np.where(np.isnan(reward), -np.inf, reward), axis=1)
    attrs = {
        "tokenizer": {"config": config_to_dict(tcfg), "sha256": "0" * 64},
        "space": space.to_dict(),
        "clip": spec.to_dict(),
        "codebook_size": tcfg.codebook_size,
        "kind": "labels",
        "search": {
            "metric": "lpips",
            "higher_is_better": False,
            "w_q": W_Q,
            "w_l": W_L,
            "calibration": {"mean": mean, "std": std, "count": int(metric.size), "seed": seed},
            "beam": None,
        },
    }
    fields = {"metric": ("float32", (len(space),)), "reward": ("float32", ())}
    with open_writer(path, attrs=attrs, num_blocks=space.blocks, extra_fields=fields) as w:
        samples = []
        for (source, start, _), b, m, r in zip(rows, best, metric, reward):
            a = space.to_tuple(int(b))
            samples.append(
                Sample(
                    key=clip_key(source, start),
                    tokens=rng.integers(0, tcfg.codebook_size, sum(a)),
                    block_lengths=a,
                    assignment=int(b),
                    source=source,
                    clip_start=start,
                    extra={"metric": m.astype(np.float32), "reward": np.float32(r[b])},
                )
            )
        w.append(samples)
    return path


@pytest.fixture(scope="module")
def videos(footage, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("videos")
    for name in ("carphone", "bikes"):
        (d / f"{name}.mp4").symlink_to(footage[name])
    return d


@pytest.fixture(scope="module")
def labels_path(videos, tmp_path_factory) -> Path:
    return make_labels_store(tmp_path_factory.mktemp("labels") / "labels.zarr", [videos])


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory) -> Path:
    """An untrained tiny classify router with the metadata training writes."""
    torch.manual_seed(0)
    model = Router(router_config("tiny"))
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a non-degenerate argmax
    d = tmp_path_factory.mktemp("router") / "r"
    model.save_pretrained(d, preset="tiny", extra={"labels": {"w_q": W_Q, "w_l": W_L}, "clip": {"fps": "native"}})
    return d


@pytest.fixture(scope="module")
def reward_router_dir(tmp_path_factory) -> Path:
    """An untrained tiny reward-head router (for --budget)."""
    torch.manual_seed(1)
    model = Router(router_config("tiny", head="reward"))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    d = tmp_path_factory.mktemp("router") / "rr"
    model.save_pretrained(d, preset="tiny", extra={"labels": {"w_q": W_Q, "w_l": W_L}, "clip": {"fps": "native"}})
    return d


# ---------------------------------------------------------------------------------- the builder
def test_labels_store_is_structured(labels_path):
    lab = load_labels(labels_path)
    assert len(lab) == 8 and lab.metric.shape == (8, 625) and lab.space == AssignmentSpace((1, 2, 4, 8, 16), 4)
    assert len(set(lab.best.tolist())) >= 3  # clips differ in their best assignment
    np.testing.assert_array_equal(lab.best_assignments(), np.nanargmax(lab.rewards(), axis=1))
    # other weights: the argmax is recomputed and gets shorter when length costs more
    cheap = lab.best_assignments(0.4, 1.6)
    assert lab.space.lengths()[cheap].mean() < lab.space.lengths()[lab.best].mean()


# ----------------------------------------------------------------------------------- policies
def test_choose_assignments_heads():
    space = AssignmentSpace((1, 2, 4), 2)
    g = np.random.default_rng(0)
    pred = g.normal(size=(5, 9))
    np.testing.assert_array_equal(choose_assignments(pred, "classify", space), pred.argmax(1))
    brute = [max(range(9), key=lambda a: 1.5 * p[a] - 0.5 * space.length_z(a)) for p in pred]
    np.testing.assert_array_equal(choose_assignments(torch.tensor(pred), "reward", space, 1.5, 0.5), brute)
    # ties: the first index wins (deterministic)
    assert choose_assignments(np.zeros((1, 9)), "classify", space)[0] == 0
    with pytest.raises(ValueError, match="head"):
        choose_assignments(pred, "oracle", space)
    with pytest.raises(ValueError, match=r"\(B, 9\)"):
        choose_assignments(pred[:, :4], "classify", space)


def test_choose_assignments_with_a_prefix():
    """The best-scoring assignment that starts with the prefix (PAPER §6: router assignment starting with (512, 128))."""
    space = AssignmentSpace((32, 64, 128, 256, 512), 4)
    g = np.random.default_rng(1)
    pred = g.normal(size=(6, 625))
    table = np.asarray(space.table())
    for head, w in (("classify", (1.0, 1.0)), ("reward", (1.2, 0.8))):
        got = choose_assignments(pred, head, space, *w, prefix=(512, 128))
        scores = routing_scores(pred, head, space, *w)
        ok = [a for a in range(625) if tuple(table[a][:2]) == (512, 128)]
        assert len(ok) == 25 and got.tolist() == [max(ok, key=lambda a: row[a]) for row in scores]
        assert all(tuple(table[a][:2]) == (512, 128) for a in got)
    assert (choose_assignments(pred, "classify", space, prefix=(512, 128)) != pred.argmax(1)).any()
    with pytest.raises(ValueError, match="levels"):
        choose_assignments(pred, "classify", space, prefix=(512, 100))


def _knapsack_best(q: np.ndarray, lengths: np.ndarray, budget: float) -> float:
    """Exact optimum of max sum_i q[i, a_i] s.t. sum_i L(a_i) <= budget * N (dynamic programming)."""
    cap = int(np.floor(budget * q.shape[0] + 1e-9))
    dp = np.full(cap + 1, -np.inf)
    dp[0] = 0.0
    for row in q:
        nxt = np.full(cap + 1, -np.inf)
        for a, length in enumerate(lengths):
            if length <= cap:
                nxt[length:] = np.maximum(nxt[length:], dp[: cap + 1 - length] + row[a])
        dp = nxt
    return float(dp.max())


def test_budget_meets_budget_and_beats_uniform():
    space = AssignmentSpace((1, 2, 4), 2)  # lengths 2..8
    lengths = space.lengths()
    g = np.random.default_rng(1)
    for trial in range(6):
        diff = g.uniform(0.2, 3.0, size=(5, 1))
        q = -diff / np.sqrt(lengths)[None, :] + g.normal(0, 0.05, (5, 9))  # concave-ish in length
        for budget in (2.0, 3.0, 4.5, 6.0):
            idx, lam = budget_assignments(q, space, budget)
            assert lengths[idx].mean() <= budget + 1e-9 and lam >= 0
            total = q[np.arange(5), idx].sum()
            for k in space.levels:  # every feasible uniform assignment is beaten or matched
                u = space.to_index(space.uniform(k))
                if lengths[u] <= budget:
                    assert total >= q[:, u].sum() - 1e-9
            assert total >= _knapsack_best(q, lengths, budget) - 0.1  # near the exact optimum
    # a budget that does not bind costs nothing
    idx, lam = budget_assignments(q, space, 100)
    assert lam == 0.0 and (idx == q.argmax(1)).all()
    with pytest.raises(ValueError, match="shortest"):
        budget_assignments(q, space, 1.5)


# --------------------------------------------------------------------------------- evaluation
def test_evaluate_bounds(labels_path):
    lab = load_labels(labels_path)
    R = lab.rewards()
    ev = evaluate(lab.best, lab)
    assert ev["top1"] == 1.0 and ev["p_router"] == pytest.approx(1.0)
    worst = np.nanargmin(R, axis=1)
    assert evaluate(worst, lab)["p_router"] == pytest.approx(0.0)
    scores = np.where(np.arange(625)[None, :] == lab.best[:, None], 0.5, 1.0) * np.arange(625)[None, :]
    ev = evaluate(worst, lab, scores=-np.abs(scores - 600))
    for k in (
        "top1",
        "top5",
        "p_router",
        "p_uniform_per_clip",
        "p_uniform_global",
        "uniform_global",
        "mean_tokens_router",
        "mean_tokens_best",
        "mean_reward_router",
        "mean_metric_router",
        "unscored",
    ):
        assert k in ev, k
    assert 0 <= ev["p_uniform_global"] <= ev["p_uniform_per_clip"] <= 1
    assert len(ev["uniform_global"]) == 4 and len(set(ev["uniform_global"])) == 1
    # per-clip best uniform by brute force
    uni = [lab.space.to_index(lab.space.uniform(k)) for k in lab.space.levels]
    r_uni = R[:, uni].max(1)
    p = (r_uni.mean() - R.min(1).mean()) / (R.max(1).mean() - R.min(1).mean())
    assert ev["p_uniform_per_clip"] == pytest.approx(p)
    # a subset of rows
    ev = evaluate(lab.best[[1, 3]], lab, rows=[1, 3])
    assert ev["clips"] == 2 and ev["top1"] == 1.0


def test_evaluate_unexplored(videos, tmp_path):
    lab = load_labels(make_labels_store(tmp_path / "beam.zarr", [videos], clips_per_video=2, nan_frac=0.5))
    assert np.isnan(lab.metric).any()
    unexplored = np.argmax(np.isnan(lab.metric), axis=1)
    ev = evaluate(unexplored, lab)
    assert ev["unscored"] == len(lab)
    ev = evaluate(lab.best, lab)
    assert ev["unscored"] == 0 and ev["p_router"] == pytest.approx(1.0)


def test_resolve_sources(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.mp4").write_bytes(b"")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "y.mp4").write_bytes(b"")
    (tmp_path / "link.mp4").symlink_to(tmp_path / "a" / "x.mp4")
    refs = [VideoRef(str(tmp_path / "a" / "x.mp4")), VideoRef(str(tmp_path / "b" / "y.mp4"))]
    found = resolve_sources(
        [str(tmp_path / "a" / "x.mp4"), str(tmp_path / "link.mp4"), "/elsewhere/y.mp4", "/z.mp4"], refs
    )
    assert found[str(tmp_path / "a" / "x.mp4")] is refs[0]
    assert found[str(tmp_path / "link.mp4")] is refs[0]  # same real path
    assert found["/elsewhere/y.mp4"] is refs[1]  # unique file name
    assert "/z.mp4" not in found


# ------------------------------------------------------------------------------------ routing
def test_route_library_deterministic(router_dir, videos, labels_path):
    a = route(router_dir, [str(videos)], clips=2, device="cpu", batch_size=3)
    b = route(router_dir, [str(videos)], clips=2, device="cpu", batch_size=3)
    assert a.records == b.records and len(a.records) == 4
    np.testing.assert_array_equal(a.predictions, b.predictions)
    model = Router.from_pretrained(router_dir)
    idx = choose_assignments(a.predictions, "classify", model.space)
    assert [r["index"] for r in a.records] == idx.tolist()
    r0 = a.records[0]
    assert r0["tokens"] == sum(r0["assignment"]) and model.space.to_index(r0["assignment"]) == r0["index"]
    assert r0["key"] == clip_key(r0["source"], r0["clip_start"])
    ev = route(router_dir, [str(videos)], eval_labels=labels_path, device="cpu").summary["eval"]
    assert ev["clips"] == 8 and 0 <= ev["p_router"] <= 1
    scores = routing_scores(a.predictions, "classify", model.space)
    assert scores.shape == (4, 625)


def _reward_router(d: Path, seed: int, w_l: float = W_L) -> Path:
    torch.manual_seed(seed)
    model = Router(router_config("tiny", head="reward"))
    torch.nn.init.normal_(model.head.weight, std=0.5)
    model.save_pretrained(d, preset="tiny", extra={"labels": {"w_q": W_Q, "w_l": w_l}, "clip": {"fps": "native"}})
    return d


def test_route_ensemble_averages_reward_routers(router_dir, reward_router_dir, videos, tmp_path):
    """Several reward routers route as one whose predicted quality is their mean (library, policy, CLI),
    and routers that would not mean the same thing are refused with one line naming the odd one."""
    other = _reward_router(tmp_path / "rr2", seed=2)
    a, b = (route(r, [str(videos)], clips=2, device="cpu") for r in (reward_router_dir, other))
    both = route([reward_router_dir, other], [str(videos)], clips=2, device="cpu", budget=40)
    mean = (a.predictions + b.predictions) / 2
    np.testing.assert_allclose(both.predictions, mean, rtol=1e-5, atol=1e-6)
    assert not np.allclose(a.predictions, b.predictions)  # the members differ, so the mean is a third router
    space = Router.from_pretrained(other).space
    idx, _ = budget_assignments(mean, space, 40)
    assert [r["index"] for r in both.records] == idx.tolist()
    assert both.summary["routers"] == [str(reward_router_dir), str(other)]
    assert a.summary["routers"] == [str(reward_router_dir)]
    # the same ensemble as an encode/eval policy: argmax of w_q * mean Q - w_l * Lz
    c = Router.from_pretrained(other).config
    policy = RouterPolicy.load([reward_router_dir, other], space, (c.frames, c.height, c.width), "cpu")
    clip = read_clips(VideoRef(str(videos / "bikes.mp4")), ClipSpec(frames=c.frames, height=c.height, width=c.width))[0]
    video = to_model_input(torch.from_numpy(clip.frames)[None])
    want = choose_assignments(policy.model.predict(video), "reward", space, W_Q, W_L)
    assert policy(video).tolist() == space.table()[want].tolist()
    assert policy.source.record()["path"] == f"{reward_router_dir}+{other}"
    # CLI: --router repeated; refusals name the router and the field
    runner = CliRunner()
    base = [
        "route",
        "--data",
        str(videos),
        "--clips",
        "2",
        "--device",
        "cpu",
        "--budget",
        "40",
        "-o",
        str(tmp_path / "a.jsonl"),
    ]
    res = runner.invoke(app, [*base, "--router", str(reward_router_dir), "--router", str(other), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["routers"] == [str(reward_router_dir), str(other)]
    for odd, why in ((router_dir, "'classify'-head router cannot join an ensemble"),
                     (_reward_router(tmp_path / "rr3", seed=3, w_l=0.4), "trade-off (w_q, w_l) (1.2, 0.4) differs")):  # fmt: skip
        res = runner.invoke(app, [*base, "--router", str(reward_router_dir), "--router", str(odd)])
        assert res.exit_code == 1
        assert str(odd) in res.stderr and why in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_cli_route_json_lines(router_dir, videos):
    runner = CliRunner()
    res = runner.invoke(
        app, ["route", "--router", str(router_dir), "--data", str(videos), "--clips", "2", "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.strip().splitlines()]
    assert len(lines) == 4
    for rec in lines:
        assert set(rec) == {"key", "source", "clip_start", "assignment", "index", "tokens"}
        assert rec["tokens"] == sum(rec["assignment"]) and len(rec["assignment"]) == 4
    again = runner.invoke(
        app, ["route", "--router", str(router_dir), "--data", str(videos), "--clips", "2", "--device", "cpu"]
    )
    assert again.stdout == res.stdout  # deterministic


def test_cli_route_eval_and_errors(router_dir, videos, labels_path, tmp_path):
    runner = CliRunner()
    out = tmp_path / "a.jsonl"
    res = runner.invoke(
        app,
        [
            "route",
            "--router",
            str(router_dir),
            "--data",
            str(videos),
            "--eval",
            str(labels_path),
            "-o",
            str(out),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    ev = summary["eval"]
    for k in ("top1", "top5", "p_router", "p_uniform_per_clip", "p_uniform_global", "mean_tokens_router"):
        assert k in ev
    assert 0 <= ev["p_router"] <= 1 and 0 <= ev["p_uniform_per_clip"] <= 1
    assert len(out.read_text().splitlines()) == 8 == summary["clips"]
    # --budget needs the reward head
    res = runner.invoke(app, ["route", "--router", str(router_dir), "--data", str(videos), "--budget", "20"])
    assert res.exit_code == 1
    assert "--budget needs a reward-head router" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["route", "--router", str(router_dir), "--data", str(videos), "--json"])
    assert res.exit_code == 2


def test_cli_route_calls_library(tmp_path):
    from evatok_cli.route import RouteResult

    summary = {
        "clips": 0,
        "mean_tokens": 0.0,
        "head": "reward",
        "w_q": 1.0,
        "w_l": 1.0,
        "budget": 64.0,
        "lambda": 0.1,
        "failures": [],
    }
    with mock.patch("evatok_cli.route.route", return_value=RouteResult([], summary, np.zeros((0, 625)))) as m:
        res = CliRunner().invoke(
            app,
            [
                "route",
                "--router",
                "r",
                "--data",
                "v1",
                "--data",
                "v2",
                "--budget",
                "64",
                "--clips",
                "all",
                "-o",
                str(tmp_path / "o.jsonl"),
                "--json",
            ],
        )
    assert res.exit_code == 0, res.output
    m.assert_called_once_with(
        Path("r"),
        ["v1", "v2"],
        clips="all",
        w_q=None,
        w_l=None,
        budget=64.0,
        eval_labels=None,
        batch_size=16,
        device="auto",
        workers=0,
        stdin=None,
    )
    assert json.loads(res.stdout)["budget"] == 64.0


# ------------------------------------------------------------------------------------ torchrun
def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        CHECKED_EVATOK,
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(router_dir, reward_router_dir, videos, labels_path, footage, tmp_path):
    """`evatok route` under torchrun (gloo): the same lines, budget and evaluation as one process."""
    three = tmp_path / "three"  # rank 0 routes videos 0 and 2, rank 1 video 1 (and the broken one)
    three.mkdir()
    for name, src in (("a.mp4", footage["carphone"]), ("b.mp4", footage["bikes"]), ("c.mp4", footage["carphone"])):
        (three / name).symlink_to(src)
    (three / "d.mp4").write_bytes(b"not a video")
    plain = [
        "route",
        "--router",
        str(router_dir),
        "--data",
        str(three),
        "--clips",
        "2",
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]
    budget = [
        "route",
        "--router",
        str(reward_router_dir),
        "--data",
        str(videos),
        "--eval",
        str(labels_path),
        "--budget",
        "20",
        "--device",
        "cpu",
        "--json",
    ]
    runner = CliRunner()
    one = runner.invoke(app, plain)
    assert one.exit_code == 0, one.output
    assert len(one.stdout.strip().splitlines()) == 6
    one_b = runner.invoke(app, budget + ["-o", str(tmp_path / "one.jsonl")])
    assert one_b.exit_code == 0, one_b.output

    two = _torchrun(plain)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout  # rank 0 prints every clip, in the one-process order
    two_b = _torchrun(budget + ["-o", str(tmp_path / "two.jsonl")])
    assert two_b.returncode == 0, two_b.stderr[-3000:]
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    s1, s2 = json.loads(one_b.stdout), json.loads(two_b.stdout.strip().splitlines()[-1])
    assert (s1.pop("world_size"), s2.pop("world_size")) == (1, 2)
    assert s1["clips"] == 8 and s1["mean_tokens"] <= 20 and s1["lambda"] > 0  # the budget binds over all clips
    assert s2.pop("lambda") == pytest.approx(s1.pop("lambda"), rel=1e-5)
    assert s2 == s1  # including the evaluation over all clips
