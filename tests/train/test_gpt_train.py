"""GPT training (AR stage) on token stores of real encoded footage: memorisation, WSD, exact resume,
store agreement, torchrun DDP.

Run as a script (under torchrun) this file is also the DDP helper of
``test_torchrun_two_ranks_identical_weights``: one rank-sharded training job whose ranks dump their
weights and first batch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evatok_cli.checkpoint import weights_sha256
from evatok_cli.encode import encode_videos
from evatok_cli.models.gpt import GPT, IGNORE_INDEX, gpt_config, parse_sequence
from evatok_cli.sampling import generate
from evatok_cli.store import open_store
from evatok_cli.train.gpt import (
    SequenceStream,
    collate_sequences,
    open_token_stores,
    steps_for_epochs,
    train_gpt,
)

# one clip per class, each with its own assignment: the memorisation target is unambiguous
ASSIGN = {"bikes": (16, 8, 2, 4), "carphone": (1, 4, 8, 16)}
COMMON = dict(preset="tiny", workers=0, log_every=1)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is much faster than two on the shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _by_source(video: torch.Tensor, keys) -> torch.Tensor:
    return torch.tensor([ASSIGN["bikes" if k.startswith("bikes") else "carphone"] for k in keys])


@pytest.fixture(scope="module")
def stores(video_dir, tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gpt-stores")
    kw = dict(tokenizer=tiny_tokenizer, label_from="parent-dir", workers=0)
    encode_videos([video_dir], d / "one.zarr", clips="first", assigner=_by_source, **kw)
    encode_videos([video_dir], d / "more.zarr", clips="2", assignment="fixed:4,4,2,1", **kw)
    encode_videos([video_dir / "ride"], d / "ride-only.zarr", clips="first", assignment="fixed:1,1,1,1", **kw)
    # frame prediction: every sample starts with the prefix assignment (16, 4) (the `paper` one for tiny)
    encode_videos([video_dir], d / "prefix.zarr", clips="first", assigner=_prefixed, **kw)
    return {
        "one": d / "one.zarr",
        "more": d / "more.zarr",
        "ride-only": d / "ride-only.zarr",
        "prefix": d / "prefix.zarr",
    }


PREFIXED = {"bikes": (16, 4, 2, 8), "carphone": (16, 4, 8, 1)}


def _prefixed(video: torch.Tensor, keys) -> torch.Tensor:
    return torch.tensor([PREFIXED["bikes" if k.startswith("bikes") else "carphone"] for k in keys])


def _curve(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_overfits_and_reproduces_memorised_sequence(stores, tiny_tokenizer, tmp_path):
    store = open_store(stores["one"])
    assert sorted((s.label, tuple(int(k) for k in s.block_lengths)) for s in store) == [
        (0, ASSIGN["bikes"]),
        (1, ASSIGN["carphone"]),
    ]
    steps = 120
    final = train_gpt(
        tokens=[stores["one"]],
        out=tmp_path / "run",
        steps=steps,
        batch_size=2,
        lr=3e-3,
        checkpoint_every=steps,
        **COMMON,
    )
    recs = _curve(tmp_path / "run")
    assert recs[0]["loss"] > 5.0 and recs[-1]["loss"] < 0.1, (recs[0]["loss"], recs[-1]["loss"])
    # WSD: constant for the first 80% of the steps, then linear to 0
    lrs = [r["lr"] for r in recs]
    assert lrs[: int(0.8 * steps)] == [3e-3] * int(0.8 * steps)
    assert all(a > b for a, b in zip(lrs[int(0.8 * steps) :], lrs[int(0.8 * steps) + 1 :])) and lrs[
        -1
    ] == pytest.approx(3e-3 / 24)  # reaches 0 at step == steps
    assert all(r["tokens"] == pytest.approx((30 + 29) / 2) for r in recs)
    # the model directory says what generation needs
    meta = json.loads((final / "config.json").read_text())
    assert meta["model_kind"] == "gpt" and meta["preset"] == "tiny"
    assert meta["class_names"] == ["ride", "talk"] and meta["codebook_size"] == 1024
    assert meta["space"] == {"levels": [1, 2, 4, 8, 16], "blocks": 4}
    assert meta["tokenizer"]["sha256"] == weights_sha256(tiny_tokenizer)
    assert meta["data"]["samples"] == 2 and meta["train"]["class_dropout"] == 0.1
    assert (final / "ema.safetensors").is_file()
    # greedy decoding with each class reproduces that class's sequence, raw and EMA weights alike
    for ema in (False, True):
        model = GPT.from_pretrained(final, ema=ema)
        assert model.config.num_classes == 2 and model.config.vocab_size == 1024 + 5 + 2 + 1
        out = generate(model, torch.tensor([s.label for s in store]), greedy=True)
        for (tokens, block_lengths), s in zip(out, store):
            assert block_lengths.tolist() == [int(k) for k in s.block_lengths], ema
            assert tokens.tolist() == s.tokens.tolist(), ema


def test_resume_equals_uninterrupted(stores, tmp_path):
    kw = dict(
        tokens=[stores["one"], stores["more"]],
        steps=6,
        batch_size=2,
        checkpoint_every=3,
        lr=1e-3,
        class_dropout=0.5,
        warmup=2,
        **COMMON,
    )
    full = train_gpt(out=tmp_path / "full", **kw)
    train_gpt(out=tmp_path / "part", stop_at=3, **kw)
    assert [r["step"] for r in _curve(tmp_path / "part")] == [0, 1, 2]
    part = train_gpt(out=tmp_path / "part", resume=True, **kw)
    a, b = _curve(tmp_path / "full"), _curve(tmp_path / "part")
    assert [r["step"] for r in b] == list(range(6))
    for ra, rb in zip(a, b):
        for k in ("loss", "grad_norm", "lr", "tokens", "pad_frac"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-6, abs=1e-7), (ra["step"], k)
    for ema in (False, True):
        ma, mb = GPT.from_pretrained(full, ema=ema), GPT.from_pretrained(part, ema=ema)
        for (n, pa), pb in zip(ma.state_dict().items(), mb.state_dict().values()):
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=n)
    # a different data set is refused on resume (the data order depends on it)
    with pytest.raises(ValueError, match="same --tokens"):
        train_gpt(out=tmp_path / "part", resume=True, **{**kw, "tokens": [stores["one"]], "steps": 8})


def test_data_is_a_function_of_the_step(stores):
    data = open_token_stores([stores["one"], stores["more"]])
    assert len(data) == 6 and data.num_classes == 2 and data.class_names == ["ride", "talk"]
    cfg = gpt_config("tiny", codebook_size=1024, levels=(1, 2, 4, 8, 16), blocks=4, num_classes=2)
    stream = SequenceStream(data, cfg, seed=3)
    # each epoch is a permutation of all samples; positions repeat identically in a fresh stream
    assert sorted(stream.position(i) for i in range(6)) == list(range(6))
    assert sorted(stream.position(i) for i in range(6, 12)) == list(range(6))
    again = SequenceStream(data, cfg, seed=3)
    for i in (7, 0, 11, 3):
        assert torch.equal(stream[i]["seq"], again[i]["seq"])
    tokens, lengths, label = parse_sequence(stream[0]["seq"], cfg)
    assert label in (0, 1) and int(lengths.sum()) == tokens.numel() == stream[0]["tokens"]
    assert steps_for_epochs(2, 6, 4) == 3 and steps_for_epochs(0.1, 6, 4) == 1


def test_epochs_and_store_agreement(stores, tmp_path, tiny_tokenizer):
    final = train_gpt(tokens=[stores["one"], stores["more"]], out=tmp_path / "e", epochs=2, batch_size=4, **COMMON)
    assert final.name == "step-00000002"  # ceil(2 epochs x 6 samples / batch 4) = 3 steps
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        train_gpt(tokens=[stores["one"]], out=tmp_path / "x", steps=2, epochs=1, **COMMON)
    with pytest.raises(ValueError, match=r"ride-only.zarr: its class names"):
        train_gpt(tokens=[stores["one"], stores["ride-only"]], out=tmp_path / "y", steps=1, **COMMON)
    with pytest.raises(ValueError, match="unknown GPT preset"):
        train_gpt(tokens=[stores["one"]], out=tmp_path / "z", steps=1, preset="huge", workers=0)


def test_dropout_is_recorded_and_trains(stores, tmp_path):
    """--dropout/--token-dropout land in the model config (config.json); the loaded model is in eval mode."""
    final = train_gpt(
        tokens=[stores["one"]], out=tmp_path / "d", steps=2, batch_size=2, dropout=0.1, token_dropout=0.05, **COMMON
    )
    cfg = json.loads((final / "config.json").read_text())["config"]
    assert (cfg["resid_dropout"], cfg["ffn_dropout"], cfg["token_dropout"]) == (0.1, 0.1, 0.05)
    assert all(r["loss"] == r["loss"] for r in _curve(tmp_path / "d"))  # finite
    model = GPT.from_pretrained(final)
    assert not model.training and model.config.resid_dropout == 0.1


# ------------------------------------------------------------------------ frame prediction (prefix)
def test_prefix_training_ignores_the_prefix_in_the_loss(stores):
    data = open_token_stores([stores["prefix"]])
    cfg = gpt_config("tiny", codebook_size=1024, levels=(1, 2, 4, 8, 16), blocks=4, num_classes=2)
    stream = SequenceStream(data, cfg, seed=0, prefix=(16, 4))
    items = [stream[i] for i in range(2)]
    n = 1 + 2 + 20  # class, two length tokens, 16 + 4 prefix tokens
    assert all(it["loss_from"] == n for it in items)
    batch = collate_sequences(items)
    ids, tg = batch["input_ids"], batch["targets"]
    assert (tg[:, :n] == IGNORE_INDEX).all()
    assert (tg[:, n] >= 1024).all() and (tg[:, n] < 1024 + 5).all()  # the first target: block 3's length token
    torch.manual_seed(0)
    model = GPT(cfg)
    logits, loss = model(ids, tg)
    logits.retain_grad()
    loss.backward()
    # no gradient reaches the logits that predict the prefix; the continuation's do get one
    assert logits.grad[:, : n - 1].abs().max() == 0 and (logits.grad[:, n - 1].abs().sum(-1) > 0).all()
    # the loss is the mean cross-entropy over the continuation (length and codebook ids), computed here
    ce = [
        torch.nn.functional.cross_entropy(
            logits[b, n - 1 : len(items[b]["seq"]) - 1].detach(), items[b]["seq"][n:], reduction="sum"
        )
        for b in range(2)
    ]
    want = sum(ce) / sum(len(it["seq"]) - n for it in items)
    torch.testing.assert_close(loss.detach(), want)
    # other prefix ids in the sequences change no target, so (for the same inputs) not the loss
    g = torch.Generator().manual_seed(1)
    other = [{**it, "seq": it["seq"].clone()} for it in items]
    for it in other:
        it["seq"][3:n] = torch.randint(0, 1024, (n - 3,), generator=g)
    tg_other = collate_sequences(other)["targets"]
    assert not torch.equal(collate_sequences(other)["input_ids"], ids)
    assert torch.equal(model(ids, tg_other)[1], model(ids, tg)[1])
    # without the prefix mask the prefix would count
    plain = collate_sequences([{**it, "loss_from": 1} for it in items])["targets"]
    assert not torch.allclose(model(ids, plain)[1], model(ids, tg)[1])


def test_prefix_training_runs_records_and_reproduces_continuations(stores, tmp_path):
    steps = 120
    final = train_gpt(tokens=[stores["prefix"]], out=tmp_path / "fp", steps=steps, batch_size=2, lr=3e-3,
                      checkpoint_every=steps, prefix_blocks=2, **COMMON)  # fmt: skip
    meta = json.loads((final / "config.json").read_text())
    assert meta["prefix"] == {"blocks": 2, "assignment": [16, 4]}  # `paper` on tiny's levels
    recs = _curve(tmp_path / "fp")
    assert recs[-1]["loss"] < 0.1, recs[-1]["loss"]
    # given each clip's real prefix, greedy decoding continues it exactly as memorised
    store = open_store(stores["prefix"])
    model = GPT.from_pretrained(final, ema=False)
    prefixes = [(torch.from_numpy(s.tokens[:20].astype("int64")), torch.tensor([16, 4])) for s in store]
    out = generate(model, torch.tensor([s.label for s in store]), prefix=prefixes, greedy=True)
    for (tokens, bl), s in zip(out, store):
        assert bl.tolist() == [int(k) for k in s.block_lengths] and tokens.tolist() == s.tokens.tolist()
    # stores whose samples do not start with the prefix are refused; resume keeps the prefix
    with pytest.raises(
        ValueError, match=r"more.zarr: 4 of 4 samples do not start with the prefix assignment \(16, 4\)"
    ):
        train_gpt(tokens=[stores["more"]], out=tmp_path / "x", steps=1, prefix_blocks=2, **COMMON)
    with pytest.raises(ValueError, match="prefix blocks must be in"):
        train_gpt(tokens=[stores["prefix"]], out=tmp_path / "x", steps=1, prefix_blocks=4, **COMMON)
    with pytest.raises(ValueError, match="prefix"):
        train_gpt(tokens=[stores["prefix"]], out=tmp_path / "fp", steps=steps + 1, resume=True, **COMMON)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_ranks_identical_weights(stores, tmp_path):
    out, dump = tmp_path / "ddp", tmp_path / "dump"
    cmd = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        __file__,
        str(stores["one"]),
        str(stores["more"]),
        str(out),
        str(dump),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    step = out / "step-00000001"
    assert (step / "rng-rank0.pt").is_file() and (step / "rng-rank1.pt").is_file()
    w0, w1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    # the ranks trained on different sequences ...
    assert not torch.equal(w0.pop("__batch__"), w1.pop("__batch__"))
    init = w0.pop("__init__")
    w1.pop("__init__")
    # ... yet hold identical weights after the steps, which moved away from the initialisation
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert any(not torch.equal(w0[k], init[k]) for k in w0)
    saved = GPT.from_pretrained(step, ema=False).state_dict()
    for k in w0:
        assert torch.equal(saved[k], w0[k]), k


def _ddp_main(paths: list[str], out: str, dump: str) -> None:
    """torchrun helper: 2 DDP steps of the GPT task through the shared loop; each rank dumps its state."""
    from evatok_cli.train import loop
    from evatok_cli.train.dist import init_distributed, shutdown
    from evatok_cli.train.gpt import GPTTask, GPTTrainConfig, sequence_batches

    env = init_distributed("cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from checked_evatok import install

    install(env.device)  # tensor collectives NCCL would reject raise
    data = open_token_stores(paths)
    cfg = gpt_config(
        "tiny",
        codebook_size=data.codebook_size,
        levels=data.space["levels"],
        blocks=data.space["blocks"],
        num_classes=data.num_classes,
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    task = GPTTask(model=model, cfg=GPTTrainConfig(steps=2, lr=1e-2), env=env, preset="tiny", extra_meta=data.record())
    batches = sequence_batches(
        SequenceStream(data, cfg, seed=0), local_batch=2, rank=env.rank, world_size=env.world_size
    )
    first = next(batches(0))
    loop.run(task, batches, cfg=loop.LoopConfig(steps=2, checkpoint_every=2), out=Path(out), env=env)
    d = Path(dump)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({**state, "__batch__": first["input_ids"], "__init__": init}, d / f"rank{env.rank}.pt")
    shutdown(env)


if __name__ == "__main__":
    _ddp_main(sys.argv[1:3], sys.argv[3], sys.argv[4])
