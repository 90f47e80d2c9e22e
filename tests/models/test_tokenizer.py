"""EVATokTokenizer: shapes over the whole space, block causality, batch invariance, block-wise
encoding/decoding, save/load, presets and parameter counts."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch

from evatok_cli.config import config_from_dict, config_to_dict
from evatok_cli.models import (
    TOKENIZER_PRESETS,
    BlockwiseCodec,
    EVATokTokenizer,
    TokenizerConfig,
    tokenizer_config,
)

TINY = TOKENIZER_PRESETS["tiny"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models gain nothing from two, and shared CI cores make OpenMP spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _video(b: int, seed: int = 0, dtype: torch.dtype = torch.float32, cfg: TokenizerConfig = TINY) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 3, cfg.frames, cfg.height, cfg.width, generator=g) * 2 - 1).to(dtype)


def _model(dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> EVATokTokenizer:
    torch.manual_seed(seed)
    return EVATokTokenizer(tokenizer_config("tiny", **overrides)).to(dtype).eval()


def _random_assignments(model: EVATokTokenizer, n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(model.space.sample(np.random.default_rng(seed), n))


@pytest.fixture(scope="module")
def tiny() -> EVATokTokenizer:
    return _model()


@pytest.fixture(scope="module")
def tiny64() -> EVATokTokenizer:
    return _model(torch.float64)


# ------------------------------------------------------------------------------- config
def test_config_validation_and_json_round_trip():
    cfg = TINY
    assert cfg.blocks == 4 and cfg.grid == (4, 4) and len(cfg.space) == 625
    assert config_from_dict(TokenizerConfig, config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="temporal_patch"):
        tokenizer_config("tiny", frames=9)
    with pytest.raises(ValueError, match="strictly increasing"):
        tokenizer_config("tiny", levels=(4, 2))
    with pytest.raises(ValueError, match="query_init"):
        tokenizer_config("tiny", query_init="magic")
    with pytest.raises(ValueError, match="unknown"):
        config_from_dict(TokenizerConfig, {**config_to_dict(cfg), "typo_field": 1})
    with pytest.raises(KeyError, match="unknown tokenizer preset"):
        tokenizer_config("huge")


def test_assignment_and_video_validation(tiny):
    v = _video(1)
    with pytest.raises(ValueError, match="not a level"):
        tiny(v, torch.tensor([[16, 8, 3, 2]]))
    with pytest.raises(ValueError, match="shape"):
        tiny(v, torch.tensor([[16, 8, 2]]))
    with pytest.raises(ValueError, match="video must be"):
        tiny(_video(1)[:, :, :4], torch.tensor([[1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="tokens but block_lengths"):
        tiny.decode([torch.zeros(3, dtype=torch.long)], torch.tensor([[1, 1, 1, 1]]))


# ------------------------------------------------------------------ shapes, whole space
def test_every_assignment_encodes_and_decodes(tiny):
    table = torch.from_numpy(tiny.space.table())  # (625, 4)
    video = _video(125, seed=1)
    K = tiny.config.codebook_size
    for chunk in table.split(125):
        tokens, lengths = tiny.encode(video, chunk)
        assert torch.equal(lengths, chunk)
        assert [t.numel() for t in tokens] == chunk.sum(1).tolist()
        assert all(t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < K for t in tokens)
        recon = tiny.decode(tokens, lengths)
        assert recon.shape == video.shape and torch.isfinite(recon).all()


def test_forward_outputs(tiny):
    a = torch.tensor([[16, 8, 2, 2], [1, 4, 16, 1]])
    out = tiny(_video(2), a)
    c = tiny.config
    assert out.recon.shape == (2, 3, 8, 32, 32)
    assert out.indices.shape == (2, 28) and (out.indices[1, 22:] == -1).all() and (out.indices[1, :22] >= 0).all()
    assert torch.equal(out.block_lengths, a)
    assert set(out.losses) >= {"vq", "codebook", "commitment", "entropy", "l1", "mse"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert 0 < float(out.stats["usage"]) <= 1 and float(out.stats["perplexity"]) >= 1
    assert float(out.stats["padding_fraction"]) == pytest.approx(6 / 56)
    assert out.dec_features.shape == (2, c.blocks, 4, 4, c.dec_width)
    tokens, _ = tiny.encode(_video(2), a)
    assert torch.equal(tokens[1], out.indices[1, :22])


def test_training_step_is_fast_and_reaches_every_parameter():
    model = _model().train()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    v, a = _video(2), torch.tensor([[16, 8, 2, 2], [1, 4, 16, 1]])
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = model(v, a)
        loss = out.losses["l1"] + out.losses["vq"] + 0.02 * out.losses["entropy"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    assert min(times) < 1.0, times


# ------------------------------------------------------------------------ causality
@pytest.mark.parametrize("t", [0, 1, 2])
def test_block_causality(tiny, t):
    pt = tiny.config.temporal_patch
    a = _random_assignments(tiny, 3, seed=t)
    v = _video(3, seed=2)
    w = v.clone()
    w[:, :, (t + 1) * pt :] = torch.rand_like(w[:, :, (t + 1) * pt :]) * 2 - 1  # change blocks > t
    out_v, out_w = tiny(v, a), tiny(w, a)
    prefix = a[:, : t + 1].sum(1)
    for b in range(3):
        n = int(prefix[b])
        assert torch.equal(out_v.indices[b, :n], out_w.indices[b, :n])
    frames = slice(0, (t + 1) * pt)
    assert torch.equal(out_v.recon[:, :, frames], out_w.recon[:, :, frames])
    assert not torch.equal(out_v.recon, out_w.recon)


def test_decoder_causality_in_tokens(tiny):
    a = torch.tensor([[4, 4, 4, 4]])
    tokens, lengths = tiny.encode(_video(1), a)
    other = tokens[0].clone()
    other[8:] = (other[8:] + 1) % tiny.config.codebook_size  # change tokens of blocks 2, 3
    r1, r2 = tiny.decode(tokens, lengths), tiny.decode([other], lengths)
    assert torch.equal(r1[:, :, :4], r2[:, :, :4]) and not torch.equal(r1[:, :, 4:], r2[:, :, 4:])


# ------------------------------------------------------------------ batch invariance
def test_batch_invariance_float64_exact_tokens(tiny64):
    a = _random_assignments(tiny64, 7, seed=3)
    v = _video(7, seed=3, dtype=torch.float64)
    out = tiny64(v, a)
    for b in range(7):
        alone = tiny64(v[b : b + 1], a[b : b + 1])
        n = int(a[b].sum())
        assert torch.equal(alone.indices[0], out.indices[b, :n])
        assert torch.allclose(alone.recon[0], out.recon[b], atol=1e-10, rtol=0)


def test_batch_invariance_float32(tiny):
    a = _random_assignments(tiny, 6, seed=4)
    v = _video(6, seed=4)
    tokens, lengths = tiny.encode(v, a)
    recon = tiny.decode(tokens, lengths)
    for b in [0, 3, 5]:
        tok1, _ = tiny.encode(v[b : b + 1], a[b : b + 1])
        assert torch.equal(tok1[0], tokens[b])
        assert torch.allclose(tiny.decode(tok1, lengths[b : b + 1])[0], recon[b], atol=1e-5, rtol=0)
    # The same clip twice with different assignments: each copy gets its own tokens.
    two, _ = tiny.encode(v[:1].expand(2, -1, -1, -1, -1), torch.tensor([[1, 1, 1, 1], [16, 16, 16, 16]]))
    assert two[0].numel() == 4 and two[1].numel() == 64


# ---------------------------------------------------------------------- block-wise API
def _run_blockwise(model, video, assignments):
    codec = BlockwiseCodec(model)
    state = codec.init(video)
    tokens, pixels = [], []
    for t in range(model.config.blocks):
        state, tok, pix = codec.step(state, assignments[:, t])
        tokens.append(tok)
        pixels.append(pix)
    flat = [torch.cat([tokens[t][b, : assignments[b, t]] for t in range(len(tokens))]) for b in range(len(video))]
    return state, flat, torch.cat(pixels, 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blockwise_equals_full_forward(tiny, tiny64, dtype):
    model = tiny64 if dtype == torch.float64 else tiny
    a = _random_assignments(model, 5, seed=5)
    v = _video(5, seed=5, dtype=dtype)
    out = model(v, a)
    state, tokens, pixels = _run_blockwise(model, v, a)
    assert state.t == 4 and torch.equal(state.enc.block_lengths, a)
    if dtype == torch.float64:
        for b in range(5):
            assert torch.equal(tokens[b], out.indices[b, : int(a[b].sum())])
        assert torch.allclose(pixels, out.recon, atol=1e-5, rtol=0)
    # Decoder alone, float32 included: the same tokens give the same pixels.
    full_tokens, lengths = model.encode(v, a)
    dec = model.decode_prefix_init(5)
    blocks = []
    for t in range(4):
        ks = lengths[:, t]
        padded = torch.full((5, int(ks.max())), -1, dtype=torch.long)
        starts = lengths.cumsum(1)[:, t] - ks
        for b in range(5):
            padded[b, : ks[b]] = full_tokens[b][starts[b] : starts[b] + ks[b]]
        dec, pix = model.decode_block(dec, padded, ks)
        blocks.append(pix)
    assert torch.allclose(torch.cat(blocks, 2), model.decode(full_tokens, lengths), atol=1e-5, rtol=0)


def test_blockwise_prefix_tree_branching(tiny64):
    """Expand every prefix m ways, as the exact search does, and compare leaves with full forwards."""
    model, levels = tiny64, torch.tensor(tiny64.config.levels)
    m = len(levels)
    v = _video(2, seed=6, dtype=torch.float64)
    codec = BlockwiseCodec(model)
    state = codec.init(v)
    prefixes = torch.zeros(2, 0, dtype=torch.long)
    for t in range(2):  # two levels of the tree: 2 clips -> 10 -> 50 branches
        state = state.repeat_interleave(m)
        prefixes = torch.cat([prefixes.repeat_interleave(m, 0), levels.repeat(len(prefixes))[:, None]], 1)
        state, _, pix = codec.step(state, prefixes[:, t])
    assert len(state) == 50 and state.t == 2
    # Keep a few branches, finish them with a fixed suffix, compare to the full model.
    keep = torch.tensor([0, 7, 24, 25, 49])
    state = state.index_select(keep)
    suffix = torch.tensor([[16, 1], [2, 8], [1, 1], [4, 16], [8, 2]])
    tokens = []
    for t in range(2):
        state, tok, _ = codec.step(state, suffix[:, t])
        tokens.append(tok)
    clip = keep // (m * m)
    a = torch.cat([prefixes[keep], suffix], 1)
    out = model(v[clip], a)
    for i in range(len(keep)):
        n_pre = int(prefixes[keep[i]].sum())
        got = torch.cat([tokens[0][i, : suffix[i, 0]], tokens[1][i, : suffix[i, 1]]])
        assert torch.equal(got, out.indices[i, n_pre : int(a[i].sum())])
    assert len(state.enc.ref) == 2  # clip features stay shared, never copied per branch


@pytest.mark.parametrize("bias", [4.0, 0.0])
def test_step_levels_equals_repeated_steps(tiny64, bias):
    """Every level at once with shared prefixes (the exact search's leaves) = m separate children."""
    model = tiny64 if bias else _model(torch.float64, dec_locality_bias=0.0)
    levels = torch.tensor(model.config.levels)
    m = len(levels)
    codec = BlockwiseCodec(model)
    state = codec.init(_video(2, seed=8, dtype=torch.float64))
    # a mixed prefix (padding in the caches) of 3 blocks, then the last block at every level
    for t, k in enumerate(([16, 1], [2, 8], [4, 4])):
        state, _, _ = codec.step(state, torch.tensor(k))
    for part in (state, state.narrow(1, 1)):
        tokens, pixels = codec.step_levels(part, levels)
        assert tokens.shape == (len(part), int(levels.sum())) and pixels.shape == (len(part), m, 3, 2, 32, 32)
        _, want_tok, want_pix = codec.step(part.repeat_interleave(m), levels.repeat(len(part)))
        starts = (levels.cumsum(0) - levels).tolist()
        for b in range(len(part)):
            for j, k in enumerate(levels.tolist()):
                assert torch.equal(tokens[b, starts[j] : starts[j] + k], want_tok[b * m + j, :k])
        torch.testing.assert_close(pixels.flatten(0, 1), want_pix, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="not a level"):
        codec.step_levels(state, (1, 3))


def test_blockwise_rejects_extra_blocks(tiny):
    codec = BlockwiseCodec(tiny)
    state = codec.init(_video(1))
    for _ in range(4):
        state, _, _ = codec.step(state, 1)
    with pytest.raises(ValueError, match="already"):
        codec.step(state, 1)
    with pytest.raises(ValueError, match="not a level"):
        codec.step(codec.init(_video(1)), 3)


# ------------------------------------------------------------------------- save / load
def test_save_load_round_trip(tmp_path, tiny):
    path = tiny.save_pretrained(tmp_path / "tok", preset="tiny")
    loaded = EVATokTokenizer.from_pretrained(path)
    assert loaded.config == tiny.config and loaded.preset == "tiny"
    a, v = torch.tensor([[16, 8, 2, 2], [1, 4, 16, 1]]), _video(2, seed=7)
    o1, o2 = tiny(v, a), loaded(v, a)
    assert torch.equal(o1.indices, o2.indices) and torch.equal(o1.recon, o2.recon)


# ---------------------------------------------------------------- presets, parameters
def test_preset_parameter_counts_on_meta_device():
    counts = {}
    for name, cfg in TOKENIZER_PRESETS.items():
        with torch.device("meta"):
            counts[name] = EVATokTokenizer(cfg).num_parameters()
    assert 130.5e6 <= counts["paper"] <= 159.5e6, counts  # paper S-B: 145M +- 10%
    assert 1e6 <= counts["small"] <= 10e6, counts
    assert counts["tiny"] < 1e6, counts
    paper = TOKENIZER_PRESETS["paper"]
    assert (paper.frames, paper.height, paper.temporal_patch, paper.spatial_patch) == (16, 128, 4, 8)
    assert paper.levels == (32, 64, 128, 256, 512) and paper.codebook_size == 16384 and len(paper.space) == 625


def test_paper_preset_is_the_papers_architecture():
    """EVATok §3.1: linear patch embedding into the Q-Former, no decoder locality bias; our extras are options."""
    paper = TOKENIZER_PRESETS["paper"]
    assert paper.patch_depth == 0 and paper.dec_locality_bias == 0.0
    with torch.device("meta"):
        model = EVATokTokenizer(paper)
        extras = EVATokTokenizer(tokenizer_config("paper", patch_depth=2, dec_locality_bias=4.0))
    assert len(model.patch_layers) == 0 and model.dec_local_bias is None
    assert 0.9 * 145e6 <= model.num_parameters() <= 1.1 * 145e6  # PAPER §2: S-B, 145M
    assert 0.9 * 145e6 <= extras.num_parameters() <= 1.1 * 145e6
    # the CPU presets keep what the ablation supports (docs/tokenizer.md "Ablation"): tiny the locality
    # bias only; small both (both help at its size, 2 seeds)
    tiny, small = TOKENIZER_PRESETS["tiny"], TOKENIZER_PRESETS["small"]
    assert (tiny.patch_depth, tiny.dec_locality_bias) == (0, 4.0)
    assert (small.patch_depth, small.dec_locality_bias) == (2, 4.0)


def test_small_preset_runs_on_cpu():
    torch.manual_seed(0)
    model = EVATokTokenizer(TOKENIZER_PRESETS["small"]).eval()
    a = torch.tensor([[128, 8, 32, 8]])
    tokens, lengths = model.encode(_video(1, cfg=model.config), a)
    assert tokens[0].numel() == 176
    assert model.decode(tokens, lengths).shape == (1, 3, 16, 64, 64)


def test_query_init_learned_and_no_locality_bias_variants():
    model = _model(query_init="learned", dec_locality_bias=0.0, pos_embed="factorized", patch_depth=0)
    assert model.query_proj is None and model.dec_local_bias is None
    out = model(_video(2), torch.tensor([[16, 8, 2, 2], [1, 4, 16, 1]]))
    assert torch.isfinite(out.recon).all()
    _, tokens, pixels = _run_blockwise(model, _video(1), torch.tensor([[2, 4, 8, 16]]))
    assert pixels.shape == (1, 3, 8, 32, 32)


def test_more_queries_than_patches_blockwise_and_batched():
    """Levels above h*w (like the paper's 512 queries over 256 patches) share pooled cells."""
    model = _model(torch.float64, levels=(2, 8, 32))
    a = torch.tensor([[32, 2, 8, 32], [2, 32, 32, 8]])
    v = _video(2, seed=9, dtype=torch.float64)
    out = model(v, a)
    _, tokens, pixels = _run_blockwise(model, v, a)
    for b in range(2):
        assert torch.equal(tokens[b], out.indices[b, : int(a[b].sum())])
    assert torch.allclose(pixels, out.recon, atol=1e-5, rtol=0)


def test_dataclass_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.frames = 4  # type: ignore[misc]


def test_forward_backward_under_bf16_autocast():
    """Training runs under bf16 autocast on CUDA; the same code path must hold on CPU autocast."""
    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config

    torch.manual_seed(0)
    m = EVATokTokenizer(tokenizer_config("tiny"))
    video = torch.rand(2, 3, 8, 32, 32) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(video, torch.tensor([[1, 2, 4, 8], [16, 16, 1, 1]]))
    loss = (out.recon.float() - video).abs().mean() + out.losses["vq"]
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
