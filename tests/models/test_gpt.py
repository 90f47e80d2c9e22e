"""GPT model: config, vocabulary and sequence helpers, presets, causal/padded forward, KV cache, checkpoints."""

from __future__ import annotations

import pytest
import torch

from evatok_cli.checkpoint import load_model
from evatok_cli.models.gpt import (
    GPT,
    GPT_PRESETS,
    IGNORE_INDEX,
    GPTConfig,
    build_sequence,
    drop_class,
    gpt_config,
    pad_batch,
    parse_sequence,
)

PAPER = dict(codebook_size=8192, levels=(32, 64, 128, 256, 512), blocks=4, num_classes=101)
SMALL = dict(codebook_size=16, levels=(2, 4, 8), blocks=3, num_classes=5)


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: intra-op threads only add sync overhead (10x slower on a busy 2-core box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(gpt_config("tiny", **{**SMALL, **overrides})).eval()


def random_clip(cfg: GPTConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, cfg.num_levels, (cfg.blocks,), generator=g)
    lengths = torch.tensor(cfg.levels)[idx]
    return torch.randint(0, cfg.codebook_size, (int(lengths.sum()),), generator=g), lengths


# ------------------------------------------------------------------------------- config + vocab
def test_vocabulary_layout() -> None:
    cfg = gpt_config("tiny", **PAPER)
    assert cfg.vocab_size == 8192 + 5 + 101 + 1
    assert [cfg.level_token(i) for i in range(5)] == list(range(8192, 8197))
    assert cfg.class_token(0) == 8197 and cfg.class_token(100) == 8297
    assert cfg.null_class_token == cfg.class_token(101) == cfg.class_token(-1) == 8298
    assert cfg.max_seq_len == 1 + 4 * 513
    with pytest.raises(ValueError):
        cfg.class_token(102)
    with pytest.raises(ValueError):
        cfg.level_token(5)


@pytest.mark.parametrize(
    "bad",
    [
        dict(levels=(4, 2)),
        dict(levels=()),
        dict(blocks=0),
        dict(codebook_size=0),
        dict(num_classes=-1),
        dict(dim=60, heads=8),  # odd head_dim
        dict(heads=4, n_kv_heads=3),
        dict(max_seq_len=10),
        dict(resid_dropout=1.0),
        dict(ffn_dropout=-0.1),
        dict(token_dropout=1.5),
    ],
)
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        GPTConfig(**{**SMALL, "dim": 64, "depth": 1, "heads": 4, **bad})


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="gpt-b"):
        gpt_config("gpt-xxl", **PAPER)


# ----------------------------------------------------------------------------- sequence helpers
def test_build_parse_pad_round_trip() -> None:
    cfg = gpt_config("tiny", **SMALL)
    g = torch.Generator().manual_seed(1)
    clips = [random_clip(cfg, g) for _ in range(6)]
    labels = [0, 3, 4, None, 2, 1]
    seqs = [build_sequence(t, bl, lab, cfg) for (t, bl), lab in zip(clips, labels)]
    for (tokens, lengths), lab, seq in zip(clips, labels, seqs):
        assert seq.dtype == torch.long and len(seq) == 1 + cfg.blocks + len(tokens)
        assert seq[0] == cfg.class_token(-1 if lab is None else lab)
        t2, l2, lab2 = parse_sequence(seq, cfg)
        assert torch.equal(t2, tokens) and torch.equal(l2, lengths)
        assert lab2 == (cfg.num_classes if lab is None else lab)

    input_ids, targets, lengths = pad_batch(seqs)
    assert lengths.tolist() == [len(s) for s in seqs]
    assert input_ids.shape == targets.shape == (6, max(len(s) for s in seqs))
    for b, s in enumerate(seqs):
        n = len(s)
        assert torch.equal(input_ids[b, :n], s)
        assert targets[b, 0] == IGNORE_INDEX and torch.equal(targets[b, 1:n], s[1:])
        assert (targets[b, n:] == IGNORE_INDEX).all()
        assert torch.equal(parse_sequence(input_ids[b, : lengths[b]], cfg)[0], clips[b][0])


def test_parse_rejects_invalid() -> None:
    cfg = gpt_config("tiny", **SMALL)
    seq = build_sequence(torch.arange(2 + 4 + 8) % 16, [2, 4, 8], 1, cfg)
    for broken in (
        seq[1:],  # no class
        seq[:-1],  # short last block
        torch.cat([seq, seq[-1:]]),  # trailing id
        torch.cat([seq[:2], seq[3:]]),  # first block one short: length token where a code is due
        torch.where(torch.arange(len(seq)) == 2, cfg.class_token(0), seq),  # class id inside a block
    ):
        with pytest.raises(ValueError):
            parse_sequence(broken, cfg)
    with pytest.raises(ValueError):
        build_sequence(torch.zeros(7, dtype=torch.long), [2, 2, 2], 0, cfg)  # 7 tokens for 6 slots
    with pytest.raises(ValueError):
        build_sequence(torch.zeros(9, dtype=torch.long), [3, 3, 3], 0, cfg)  # 3 is not a level
    with pytest.raises(ValueError):
        build_sequence(torch.full((6,), 16), [2, 2, 2], 0, cfg)  # id outside the codebook


def test_drop_class() -> None:
    cfg = gpt_config("tiny", **SMALL)
    ids = torch.full((1000, 4), 3)
    ids[:, 0] = cfg.class_token(2)
    out = drop_class(ids, 0.25, cfg, torch.Generator().manual_seed(0))
    dropped = out[:, 0] == cfg.null_class_token
    assert 0.2 < dropped.float().mean() < 0.3
    assert (out[~dropped, 0] == cfg.class_token(2)).all() and torch.equal(out[:, 1:], ids[:, 1:])
    assert drop_class(ids, 0.0, cfg) is ids


# ------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("name,target", [("gpt-b", 99e6), ("gpt-l", 327e6), ("gpt-l-plus", 633e6)])
def test_preset_sizes(name: str, target: float) -> None:
    with torch.device("meta"):
        model = GPT(gpt_config(name, **PAPER))
    assert abs(model.num_params() - target) <= 0.1 * target, model.num_params()


def test_tiny_preset_is_tiny() -> None:
    with torch.device("meta"):
        assert GPT(GPT_PRESETS["tiny"](**PAPER)).num_params() < 1e6
    assert small_model().num_params() < 2e5


# ------------------------------------------------------------------------------------- forward
def test_forward_loss_and_padding_invariance() -> None:
    model = small_model()
    cfg = model.config
    g = torch.Generator().manual_seed(2)
    seqs = [build_sequence(*random_clip(cfg, g), c, cfg) for c in range(4)]
    input_ids, targets, lengths = pad_batch(seqs)
    logits, loss = model(input_ids, targets)
    assert logits.shape == (4, input_ids.shape[1], cfg.vocab_size)
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)
    assert model(input_ids)[1] is None
    # right padding and batch neighbours do not change a row's valid logits (causal attention)
    for b, s in enumerate(seqs):
        alone = model(s[None])[0][0]
        torch.testing.assert_close(logits[b, : len(s)], alone, atol=1e-5, rtol=1e-5)
    # loss = mean CE over every predicted id (all positions after the class)
    ce = torch.nn.functional.cross_entropy
    total = sum(ce(model(s[None])[0][0, :-1], s[1:], reduction="sum") for s in seqs)
    torch.testing.assert_close(loss, total / sum(len(s) - 1 for s in seqs), atol=1e-5, rtol=1e-5)
    # causality: changing a later id leaves earlier logits unchanged
    s = seqs[0].clone()
    s[-1] = (s[-1] + 1) % cfg.codebook_size
    torch.testing.assert_close(model(s[None])[0][0, :-1], logits[0, : len(s) - 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, dict(n_kv_heads=None, tie_embeddings=False)])
def test_prefill_decode_match_full_forward(overrides: dict) -> None:
    model = small_model(3, **overrides)
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    seqs = torch.stack([build_sequence(*random_clip(cfg, g), 1, cfg)[:12] for _ in range(2)])  # (2, 12)
    full = model(seqs)[0]  # (2, 12, V)
    with torch.no_grad():
        cache = model.new_cache(2)
        out = [model.prefill(seqs[:, :5], cache)]  # multi-token prefill
        for i in range(5, 9):
            out.append(model.decode_step(seqs[:, i : i + 1], cache))
        out.append(model.prefill(seqs[:, 9:12], cache))  # a chunk at a non-zero offset
    assert cache.pos == 12
    torch.testing.assert_close(out[0], full[:, 4], atol=1e-5, rtol=1e-5)
    for j, i in enumerate(range(5, 9)):
        torch.testing.assert_close(out[1 + j], full[:, i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[-1], full[:, 11], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        model.decode_step(seqs[:, :2], cache)


def test_dropout_zero_is_todays_model() -> None:
    """Dropout 0 (the default): no new modules or weights, no RNG draws, train mode == eval mode bit for bit,
    and a config.json written before the dropout fields existed loads to the same model."""
    from evatok_cli.config import config_from_dict, config_to_dict

    model = small_model(4)
    cfg = model.config
    assert (cfg.token_dropout, cfg.resid_dropout, cfg.ffn_dropout) == (0.0, 0.0, 0.0)
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    old = {k: v for k, v in config_to_dict(cfg).items() if not k.endswith("dropout")}
    assert config_from_dict(GPTConfig, old) == cfg
    torch.manual_seed(4)
    assert list(GPT(config_from_dict(GPTConfig, old)).state_dict()) == list(model.state_dict())
    g = torch.Generator().manual_seed(4)
    input_ids, targets, _ = pad_batch([build_sequence(*random_clip(cfg, g), c, cfg) for c in range(3)])
    eval_logits, eval_loss = model(input_ids, targets)
    rng = torch.get_rng_state()
    model.train()
    train_logits, train_loss = model(input_ids, targets)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drew random numbers
    assert torch.equal(train_logits, eval_logits) and torch.equal(train_loss, eval_loss)


def test_dropout_acts_in_training_only() -> None:
    drop = dict(token_dropout=0.1, resid_dropout=0.2, ffn_dropout=0.3)
    model, plain = small_model(5, **drop), small_model(5)
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 1 + 2 * model.config.depth
    assert list(model.state_dict()) == list(plain.state_dict())  # dropout has no weights
    cfg = model.config
    g = torch.Generator().manual_seed(5)
    input_ids, targets, _ = pad_batch([build_sequence(*random_clip(cfg, g), c, cfg) for c in range(3)])
    # eval mode: deterministic, and the same function as the model without dropout
    a, b = model(input_ids)[0], model(input_ids)[0]
    assert torch.equal(a, b) and torch.equal(a, plain(input_ids)[0])
    with torch.no_grad():  # the cached (sampling) path too
        cache = model.new_cache(3)
        assert torch.equal(model.prefill(input_ids[:, :6], cache), plain(input_ids[:, :6])[0][:, -1])
    # training mode: random, seeded by the global RNG
    model.train()
    torch.manual_seed(0)
    t1 = model(input_ids, targets)
    torch.manual_seed(0)
    t2 = model(input_ids, targets)
    t3 = model(input_ids, targets)
    assert torch.equal(t1[0], t2[0]) and not torch.equal(t1[0], t3[0]) and not torch.equal(t1[0], a)
    t1[1].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cache_overflow() -> None:
    model = small_model()
    cache = model.new_cache(1, max_len=3)
    with torch.no_grad():
        model.prefill(torch.zeros(1, 3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="full"):
            model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache)


# ---------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tmp_path, tied: bool) -> None:
    model = small_model(4, tie_embeddings=tied)
    ids = build_sequence(torch.arange(14) % 16, [2, 4, 8], 3, model.config)[None]
    path = model.save_pretrained(tmp_path / "gpt", preset="tiny")
    loaded = GPT.from_pretrained(path)
    assert loaded.config == model.config and loaded.preset == "tiny"
    assert (loaded.head.weight is loaded.tok_emb.weight) == tied
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert isinstance(load_model(path, kind="gpt"), GPT)
