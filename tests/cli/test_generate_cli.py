"""`evatok train gpt` and `evatok generate` through the Typer app: the exact library calls, a real
GPT trained on encoded real footage, playable mp4s, a structurally valid sample store, class names,
reproducibility and the refusal of a mismatched tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from evatok_cli.checkpoint import weights_sha256
from evatok_cli.cli import app
from evatok_cli.encode import encode_videos
from evatok_cli.generate import GenerateSummary
from evatok_cli.models.gpt import GPT, build_sequence, parse_sequence
from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
from evatok_cli.store import open_store
from evatok_cli.train.checkpoints import resolve_model_dir
from evatok_cli.video import probe

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is much faster than two on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mixed(video: torch.Tensor, keys) -> torch.Tensor:
    return torch.tensor([(16, 8, 2, 4) if k.startswith("bikes") else (1, 4, 8, 16) for k in keys])


@pytest.fixture(scope="module")
def gpt_run(video_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny GPT trained for a few steps by `evatok train gpt` on a store of real encoded clips."""
    d = tmp_path_factory.mktemp("gen")
    store = d / "train.zarr"
    encode_videos(
        [video_dir], store, tokenizer=tiny_tokenizer, clips="2", label_from="parent-dir", workers=0, assigner=_mixed
    )
    res = runner.invoke(
        app,
        [
            "train",
            "gpt",
            "--tokens",
            str(store),
            "--preset",
            "tiny",
            "--out",
            str(d / "run"),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--workers",
            "0",
            "--lr",
            "1e-3",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    return d / "run"


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("models") / "other-tokenizer"
    EVATokTokenizer(tokenizer_config("tiny")).save_pretrained(path, preset="tiny")
    return path


def test_generate_cli_calls_library_with_exact_kwargs(monkeypatch):
    calls = []

    def fake(gpt, out, **kw):
        calls.append((gpt, out, kw))
        return GenerateSummary(
            out=str(out), samples=2, mean_tokens=30.0, min_tokens=29, most_tokens=31, assignments={"16,8,2,4": 2}
        )

    monkeypatch.setattr("evatok_cli.generate.generate_videos", fake)
    res = runner.invoke(
        app,
        [
            "generate",
            "--gpt",
            "g",
            "--tokenizer",
            "t",
            "--classes",
            "0, ride,17",
            "--num",
            "4",
            "-o",
            "o",
            "--cfg",
            "3",
            "--temperature",
            "0.9",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--max-tokens",
            "40",
            "--seed",
            "7",
            "--format",
            "both",
            "--batch-size",
            "5",
            "--device",
            "cpu",
            "--no-ema",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert calls == [
        (
            Path("g"),
            Path("o"),
            dict(
                tokenizer=Path("t"),
                classes=["0", "ride", "17"],
                num=4,
                cfg_scale=3.0,
                temperature=0.9,
                top_k=50,
                top_p=0.95,
                max_tokens=40,
                seed=7,
                format="both",
                batch_size=5,
                device="cpu",
                ema=False,
                prefix=None,
                prefix_blocks=None,
                prefix_frames=None,
                prefix_assignment=None,
            ),
        )
    ]
    assert json.loads(res.stdout)["assignments"] == {"16,8,2,4": 2}
    calls.clear()
    res = runner.invoke(app, ["generate", "--gpt", "g", "--tokenizer", "t", "-o", "o", "--quiet"])
    assert res.exit_code == 0 and calls[0][2]["classes"] is None and calls[0][2]["cfg_scale"] is None
    calls.clear()
    cont = ["--prefix", "a.mp4", "--prefix", "b.mp4", "--prefix-blocks", "2", "--prefix-frames", "3"]
    res = runner.invoke(
        app, ["generate", "--gpt", "g", "--tokenizer", "t", "-o", "o", *cont, "--prefix-assignment", "16,4", "--quiet"]
    )
    assert res.exit_code == 0, res.output
    kw = calls[0][2]
    assert kw["prefix"] == [Path("a.mp4"), Path("b.mp4")] and kw["classes"] is None and kw["cfg_scale"] is None
    assert (kw["prefix_blocks"], kw["prefix_frames"], kw["prefix_assignment"]) == (2, 3, "16,4")
    for bad in (["--format", "gif"], ["--num", "0"], ["--classes", ","], ["--prefix-blocks", "2"]):
        res = runner.invoke(app, ["generate", "--gpt", "g", "--tokenizer", "t", "-o", "o", *bad])
        assert res.exit_code == 2, bad


def test_train_gpt_cli_calls_library_with_exact_kwargs(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr("evatok_cli.train.gpt.train_gpt", lambda **kw: calls.append(kw) or tmp_path)
    res = runner.invoke(
        app,
        [
            "train",
            "gpt",
            "--tokens",
            "a.zarr",
            "--tokens",
            "b",
            "--preset",
            "gpt-l",
            "--out",
            "r",
            "--epochs",
            "2.5",
            "--batch-size",
            "8",
            "--class-dropout",
            "0.2",
            "--lr",
            "3e-4",
            "--warmup",
            "10",
            "--resume",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    kw = calls[0]
    assert kw.pop("on_log") is None
    assert kw == dict(
        tokens=[Path("a.zarr"), Path("b")],
        preset="gpt-l",
        out=Path("r"),
        steps=None,
        epochs=2.5,
        batch_size=8,
        resume=True,
        seed=3,
        device="cpu",
        workers=0,
        checkpoint_every=1000,
        keep_last=3,
        log_every=50,
        stop_at=None,
        lr=3e-4,
        warmup=10,
        class_dropout=0.2,
        dropout=0.0,
        token_dropout=0.0,
        prefix_blocks=0,
        prefix_assignment=None,
    )
    res = runner.invoke(
        app,
        [
            "train",
            "gpt",
            "--tokens",
            "a",
            "--out",
            "r",
            "--steps",
            "3",
            "--dropout",
            "0.1",
            "--token-dropout",
            "0.05",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert (calls[1]["dropout"], calls[1]["token_dropout"]) == (0.1, 0.05)
    res = runner.invoke(
        app,
        ["train", "gpt", "--tokens", "a", "--out", "r", "--steps", "3", "--prefix-blocks", "2",
         "--prefix-assignment", "max", "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (calls[2]["prefix_blocks"], calls[2]["prefix_assignment"]) == (2, "max")
    for bad in (
        ["--steps", "3", "--epochs", "1"],
        [],
        ["--steps", "3", "--preset", "huge"],
        ["--steps", "3", "--dropout", "1.0"],
        ["--steps", "3", "--token-dropout", "-0.1"],
        ["--steps", "3", "--prefix-blocks", "-1"],
        ["--steps", "3", "--prefix-assignment", "max"],
    ):
        res = runner.invoke(app, ["train", "gpt", "--tokens", "a", "--out", "r", *bad])
        assert res.exit_code == 2, bad


def test_generate_writes_playable_mp4s_and_a_valid_store(gpt_run, tiny_tokenizer, tmp_path):
    out = tmp_path / "samples"
    res = runner.invoke(
        app,
        [
            "generate",
            "--gpt",
            str(gpt_run),
            "--tokenizer",
            str(tiny_tokenizer),
            "--classes",
            "0,1",
            "--num",
            "2",
            "-o",
            str(out),
            "--format",
            "both",
            "--batch-size",
            "3",
            "--device",
            "cpu",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["cfg_scale"] == 2.5  # the tiny/gpt-b default (PAPER §6)
    names = ["class-ride_0", "class-ride_1", "class-talk_0", "class-talk_1"]
    assert [r["name"] for r in summary["per_sample"]] == names
    assert sorted(Path(f).name for f in summary["files"]) == [f"{n}.mp4" for n in names]
    assert sum(summary["assignments"].values()) == 4
    assert summary["mean_tokens"] == pytest.approx(sum(r["tokens"] for r in summary["per_sample"]) / 4)
    assert "tokens per sample: mean" in res.stderr
    tok_cfg = tokenizer_config("tiny")
    for f in summary["files"]:
        info = probe(f)
        assert (info.frames, info.height, info.width) == (tok_cfg.frames, tok_cfg.height, tok_cfg.width)
        assert info.codec == "h264"
    store = open_store(out / "samples.zarr")
    assert len(store) == 4 and store.keys == names
    assert store.attrs["tokenizer"]["sha256"] == weights_sha256(tiny_tokenizer)
    assert store.attrs["labels"] == ["ride", "talk"] and store.attrs["kind"] == "generate"
    assert store.attrs["generate"]["cfg_scale"] == 2.5
    cfg = GPT.from_pretrained(resolve_model_dir(gpt_run)).config
    space = store.space
    for s, rec in zip(store, summary["per_sample"]):
        assert s.label == rec["class"] and len(s.tokens) == rec["tokens"]
        assert tuple(int(k) for k in s.block_lengths) == space.to_tuple(s.assignment) == tuple(rec["block_lengths"])
        seq = build_sequence(torch.as_tensor(s.tokens.astype("int64")), s.block_lengths.astype("int64"), s.label, cfg)
        tokens, _, label = parse_sequence(seq, cfg)  # a valid sequence
        assert label == s.label and tokens.tolist() == s.tokens.tolist()
    # the store decodes like any other
    from evatok_cli.decode import decode_store

    dec = decode_store(out / "samples.zarr", tmp_path / "dec", tokenizer=tiny_tokenizer, limit=1, device="cpu")
    assert dec.written == 1 and probe(dec.files[0]).frames == tok_cfg.frames
    # the same seed (and batch size) gives the same samples
    res = runner.invoke(
        app,
        [
            "generate",
            "--gpt",
            str(gpt_run),
            "--tokenizer",
            str(tiny_tokenizer),
            "--classes",
            "0,1",
            "--num",
            "2",
            "-o",
            str(tmp_path / "again"),
            "--format",
            "store",
            "--batch-size",
            "3",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    again = open_store(tmp_path / "again" / "samples.zarr")
    assert [x.tokens.tolist() for x in again] == [x.tokens.tolist() for x in store]
    assert not list((tmp_path / "again").glob("*.mp4"))
    # an existing sample store is not overwritten
    res = runner.invoke(
        app,
        [
            "generate",
            "--gpt",
            str(gpt_run),
            "--tokenizer",
            str(tiny_tokenizer),
            "-o",
            str(tmp_path / "again"),
            "--format",
            "store",
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 1 and "already exists" in res.stderr


def test_class_names_and_unknown_classes(gpt_run, tiny_tokenizer, tmp_path):
    out = tmp_path / "named"
    res = runner.invoke(
        app,
        [
            "generate",
            "--gpt",
            str(gpt_run),
            "--tokenizer",
            str(tiny_tokenizer),
            "--classes",
            "talk,ride,null",
            "-o",
            str(out),
            "--cfg",
            "1",
            "--max-tokens",
            "8",
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    recs = json.loads(res.stdout)["per_sample"]
    assert [(r["name"], r["class"]) for r in recs] == [("class-talk_0", 1), ("class-ride_0", 0), ("class-null_0", 2)]
    assert all(r["tokens"] <= 8 for r in recs)  # the token budget
    assert sorted(p.name for p in out.glob("*.mp4")) == ["class-null_0.mp4", "class-ride_0.mp4", "class-talk_0.mp4"]
    for bad, msg in ((["--classes", "jump"], "unknown class 'jump'"), (["--classes", "5"], "out of range")):
        res = runner.invoke(
            app,
            [
                "generate",
                "--gpt",
                str(gpt_run),
                "--tokenizer",
                str(tiny_tokenizer),
                "-o",
                str(tmp_path / "x"),
                "--device",
                "cpu",
                *bad,
            ],
        )
        assert res.exit_code == 1 and msg in res.stderr, res.output
        assert res.stderr.count("\n") == 1  # one line


def test_mismatched_tokenizer_is_refused(gpt_run, other_tokenizer, tmp_path):
    res = runner.invoke(
        app,
        [
            "generate",
            "--gpt",
            str(gpt_run),
            "--tokenizer",
            str(other_tokenizer),
            "-o",
            str(tmp_path / "x"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 1
    assert "not the tokenizer" in res.stderr and "sha256" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------- video continuation (frame prediction)
def _prefixed(video: torch.Tensor, keys) -> torch.Tensor:
    return torch.tensor([(16, 4, 2, 8) if k.startswith("bikes") else (16, 4, 8, 1) for k in keys])


@pytest.fixture(scope="module")
def fp_run(video_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    """A tiny GPT trained by `evatok train gpt --prefix-blocks 2` on real clips that start with (16, 4)."""
    d = tmp_path_factory.mktemp("fp")
    store = d / "train.zarr"
    encode_videos(
        [video_dir], store, tokenizer=tiny_tokenizer, clips="2", label_from="parent-dir", workers=0, assigner=_prefixed
    )
    args = ["train", "gpt", "--tokens", str(store), "--preset", "tiny", "--out", str(d / "run"), "--steps", "3"]
    res = runner.invoke(app, [*args, "--batch-size", "2", "--workers", "0", "--prefix-blocks", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    return d / "run"


def test_generate_continues_real_footage(fp_run, tiny_tokenizer, footage, tmp_path):
    from evatok_cli.video import ClipReader, ClipSpec, to_model_input

    clips = [footage["bikes"], footage["carphone"]]
    out = tmp_path / "cont"
    args = ["generate", "--gpt", str(fp_run), "--tokenizer", str(tiny_tokenizer), "--prefix", str(clips[0])]
    args += ["--prefix", str(clips[1]), "--prefix-frames", "3", "--num", "2", "--format", "both", "--batch-size", "3"]
    res = runner.invoke(app, [*args, "-o", str(out), "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["cfg_scale"] == 1.0  # continuation: unconditional, no CFG (PAPER §6, K600)
    assert summary["prefix"] == {"blocks": 2, "assignment": [16, 4], "frames": 3, "padded_to": 4, "tokens": 20,
                                 "sources": [str(c) for c in clips]}  # fmt: skip
    names = ["prefix-bikes_0", "prefix-bikes_1", "prefix-carphone_pristine_0", "prefix-carphone_pristine_1"]
    assert [r["name"] for r in summary["per_sample"]] == names
    assert sorted(Path(f).name for f in summary["files"]) == sorted(f"{n}.mp4" for n in names)
    for f in summary["files"]:
        assert probe(f).frames == 8

    tok = EVATokTokenizer.from_pretrained(tiny_tokenizer).eval()
    spec = ClipSpec(frames=8, height=32, width=32)
    expected = []
    for c in clips:  # encoded here: the first 3 frames, the 4th repeating the 3rd, with (16, 4) then anything
        with ClipReader(c, spec) as r:
            frames = r.read(0).frames.copy()
        frames[3:] = frames[2]
        tokens, _ = tok.encode(to_model_input(torch.from_numpy(frames)[None]), torch.tensor([[16, 4, 16, 16]]))
        expected.append(tokens[0][:20])
    store = open_store(out / "samples.zarr")
    assert store.keys == names and store.attrs["generate"]["prefix"]["assignment"] == [16, 4]
    levels = store.space.levels
    decoded = []
    for s, rec in zip(store, summary["per_sample"]):
        tokens = torch.from_numpy(s.tokens.astype("int64"))
        bl = [int(k) for k in s.block_lengths]
        # the prefix is exactly the encoded condition; the continuation is structurally valid
        assert torch.equal(tokens[:20], expected[clips.index(Path(rec["prefix"]))])
        assert bl[:2] == [16, 4] and all(k in levels for k in bl[2:]) and len(tokens) == sum(bl)
        assert int(tokens.max()) < 1024 and int(tokens.min()) >= 0 and s.label == -1
        decoded.append(tok.decode([tokens], torch.tensor([bl])))
    # the first 2 blocks (4 frames) of every continuation of a clip reconstruct the same prefix
    for a, b in ((0, 1), (2, 3)):
        torch.testing.assert_close(decoded[a][:, :, :4], decoded[b][:, :, :4])
    assert not torch.allclose(decoded[0][:, :, :4], decoded[2][:, :, :4])

    # the same seed gives the same continuations; a class with CFG runs the guided path
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "again"), "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    again = open_store(tmp_path / "again" / "samples.zarr")
    assert [x.tokens.tolist() for x in again] == [x.tokens.tolist() for x in store]
    res = runner.invoke(
        app, [*args[:7], "--classes", "ride", "--cfg", "2", "-o", str(tmp_path / "cls"), "--device", "cpu", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert [r["name"] for r in json.loads(res.stdout)["per_sample"]] == ["prefix-bikes_class-ride_0"]
    # bad prefix options are one-line errors
    for bad, msg in ((["--prefix-blocks", "4"], "--prefix-blocks"), (["--prefix-frames", "5"], "--prefix-frames"),
                     (["--prefix-assignment", "3,3"], "non-levels")):  # fmt: skip
        res = runner.invoke(app, [*args[:7], *bad, "-o", str(tmp_path / "bad"), "--device", "cpu"])
        assert res.exit_code == 1 and msg in res.output, res.output
    res = runner.invoke(app, [*args[:5], "--prefix", str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "m")])
    assert res.exit_code == 1 and "missing.mp4" in res.output and not (tmp_path / "m").exists()
