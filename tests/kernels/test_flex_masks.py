"""FlexAttention mask_mods of evatok_kernels.flex against the dense masks of models/attention.py.

Each mask_mod, materialised on the full grid, must equal the dense bool mask the CPU path builds from
the same random ragged layout; FlexAttention (eager on CPU: forward only, torch has no CPU backward)
must equal SDPA under the dense mask. On CUDA the same checks run on the GPU (eagerly), and the
compiled kernel (what ``Attention`` runs there) is checked forward and backward against SDPA.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evatok_cli.models.attention import (
    Attention,
    additive_mask,
    attend_somewhere,
    block_causal_mask,
    locality_mask,
    packed_layout,
    padding_mask,
    patch_block_ids,
)
from evatok_kernels import flex

pytestmark = pytest.mark.skipif(not flex.flex_available(), reason="this torch has no FlexAttention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LEVELS = (1, 2, 4, 8, 16)
T, N_PATCH = 4, 6  # blocks, patches per block


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _layout(seed: int, batch: int = 3, extra_pad: int = 3, levels: tuple[int, ...] = LEVELS):
    """Random ragged (B, T) assignment -> packed layout (with extra all-padding columns)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(levels)[torch.randint(len(levels), (batch, T), generator=g)]
    L = int(lengths.sum(1).max()) + extra_pad
    bid, idx, valid = packed_layout(lengths, L)
    return lengths.to(DEVICE), bid.to(DEVICE), idx.to(DEVICE), valid.to(DEVICE)


def _patches() -> torch.Tensor:
    return patch_block_ids(T, N_PATCH, device=DEVICE)


def _mat(mod, B, Lq, Lk):
    return flex.materialize(mod, B, Lq, Lk, device=DEVICE)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokenizer_mask_mods_equal_dense_masks(seed):
    _, bid, _, valid = _layout(seed)
    pb = _patches()
    B, L, N = bid.shape[0], bid.shape[1], pb.shape[0]
    cases = {
        "encoder_self": (flex.encoder_self(bid, valid), block_causal_mask(bid, bid, valid, valid), L, L),
        "encoder_cross": (flex.encoder_cross(bid, valid, pb), block_causal_mask(bid, pb, valid), L, N),
        "decoder_cross": (flex.decoder_cross(pb, bid, valid), block_causal_mask(pb, bid, None, valid), N, L),
        "padding": (flex.padding(valid, valid), padding_mask(valid, valid), L, L),
    }
    for name, (mod, dense, lq, lk) in cases.items():
        assert torch.equal(_mat(mod, B, lq, lk), dense), name
    # Unbatched layout (decoder / reference-layer self-attention): (1, 1, N, N).
    assert torch.equal(_mat(flex.decoder_self(pb), 1, N, N), block_causal_mask(pb, pb))


def test_empty_rows_attend_key_zero_like_attend_somewhere():
    # Sample 1 has no valid key at all; sample 0's keys all sit in block 2 (queries of blocks < 2
    # see nothing): every such row must see key 0 only, exactly as the dense path.
    q_bid = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]], device=DEVICE)
    kv_bid = torch.tensor([[2, 2, 3], [0, 0, 0]], device=DEVICE)
    q_valid = torch.tensor([[True, True, True, False], [True, True, True, True]], device=DEVICE)
    kv_valid = torch.tensor([[True, True, True], [False, False, False]], device=DEVICE)
    dense = block_causal_mask(q_bid, kv_bid, q_valid, kv_valid)
    got = _mat(flex.block_causal(q_bid, kv_bid, q_valid, kv_valid), 2, 4, 3)
    assert torch.equal(got, dense)
    assert got[0, 0, 0].tolist() == [True, False, False] and got[1, 0].sum() == 4
    assert torch.equal(_mat(flex.padding(q_valid, kv_valid), 2, 4, 3), padding_mask(q_valid, kv_valid))


def test_gpt_causal_padded_equals_dense_causal_with_padding():
    lengths = torch.tensor([9, 4, 1], device=DEVICE)
    L = 9
    pos = torch.arange(L, device=DEVICE)
    kv_valid = pos[None, :] < lengths[:, None]  # (B, L)
    causal = pos[None, :] <= pos[:, None]  # (L, L)
    dense = attend_somewhere(causal[None] & kv_valid[:, None, :])[:, None]
    assert torch.equal(_mat(flex.causal_padded(lengths), 3, L, L), dense)
    # Valid queries see exactly what is_causal=True gives them.
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(dense[b, 0, :n, :n], causal[:n, :n])


@pytest.mark.parametrize("block_size", [8, 16])
def test_block_mask_from_dense_tiles(block_size):
    _, bid, _, valid = _layout(3)
    dense = block_causal_mask(bid, bid, valid, valid)
    bm = flex.block_mask_from_dense(dense, block_size)
    # Every allowed entry lies in a kept tile, and a tile is kept iff it holds an allowed entry.
    B, _, L, _ = dense.shape
    n = -(-L // block_size)
    tiles = F.pad(dense, (0, n * block_size - L, 0, n * block_size - L)).view(B, 1, n, block_size, n, block_size)
    want = tiles.any(5).any(3)  # (B, 1, n, n)
    assert torch.equal(bm.to_dense().bool(), want)
    # Its mask_mod reproduces the dense mask.
    assert torch.equal(_mat(bm.mask_mod, B, L, L), dense)


def _qkv(B, H, Lq, Lk, dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, dh, generator=g).to(DEVICE) for n in (Lq, Lk, Lk)]


@pytest.mark.parametrize("seed", [0, 1])
def test_flex_forward_equals_sdpa_on_ragged_batches(seed):
    _, bid, _, valid = _layout(seed)
    pb = _patches()
    B, L, N = bid.shape[0], bid.shape[1], pb.shape[0]
    layouts = [
        (flex.encoder_self(bid, valid), block_causal_mask(bid, bid, valid, valid), B, L, L),
        (flex.encoder_cross(bid, valid, pb), block_causal_mask(bid, pb, valid), B, L, N),
        (flex.decoder_cross(pb, bid, valid), block_causal_mask(pb, bid, None, valid), B, N, L),
        (flex.decoder_self(pb), block_causal_mask(pb, pb), 1, N, N),
    ]
    for i, (mod, dense, mb, lq, lk) in enumerate(layouts):
        q, k, v = _qkv(B, 2, lq, lk, seed=seed + 10 * i)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        bm = flex.block_mask(mod, mb, lq, lk, device=DEVICE, block_size=16)
        torch.testing.assert_close(flex.flex_attention(q, k, v, bm, compiled=False), ref, atol=1e-5, rtol=1e-5)
        got = flex.flex_attention_dense(q, k, v, dense, block_size=16, compiled=False)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_locality_bias_score_mod_equals_additive_float_mask():
    lengths, bid, idx, valid = _layout(4)
    pb = _patches()
    B, L, N = bid.shape[0], bid.shape[1], pb.shape[0]
    q_pos = torch.arange(N_PATCH, device=DEVICE).repeat(T)  # (N,) position inside the block
    g = torch.Generator().manual_seed(5)
    cover = (torch.rand(B, L, N_PATCH, generator=g) < 0.4).to(DEVICE)  # (B, L, h*w)
    bias = torch.tensor(2.5, device=DEVICE)
    allowed = block_causal_mask(pb, bid, None, valid)
    dense = additive_mask(allowed, bias * locality_mask(pb, q_pos, bid, cover).float())
    q, k, v = _qkv(B, 2, N, L, seed=6)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    bm = flex.block_mask(flex.decoder_cross(pb, bid, valid), B, N, L, device=DEVICE, block_size=16)
    got = flex.flex_attention(q, k, v, bm, flex.locality_bias(pb, q_pos, bid, cover, bias), compiled=False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _count_flex_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = flex.flex_attention_dense

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(flex, "flex_attention_dense", counting)
    return calls


def test_attention_module_flex_path_equals_sdpa(monkeypatch):
    calls = _count_flex_calls(monkeypatch)
    _, bid, _, valid = _layout(7)
    torch.manual_seed(0)
    attn = Attention(16, 2).to(DEVICE)
    x = torch.randn(bid.shape[0], bid.shape[1], 16, device=DEVICE)
    mask = block_causal_mask(bid, bid, valid, valid)
    with torch.no_grad():  # CPU FlexAttention is forward-only
        monkeypatch.setenv("EVATOK_ATTENTION", "sdpa")
        ref = attn(x, *attn.kv(x), mask)
        monkeypatch.setenv("EVATOK_ATTENTION", "flex")
        assert not calls
        got = attn(x, *attn.kv(x), mask)
    assert len(calls) == 1
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_attention_backend_env(monkeypatch):
    from evatok_cli.models.attention import attention_backend, use_flex

    q = torch.zeros(1, 1, 2, 4)
    monkeypatch.delenv("EVATOK_ATTENTION", raising=False)
    assert attention_backend() == "auto" and not use_flex(q)  # CPU default: SDPA
    monkeypatch.setenv("EVATOK_ATTENTION", "flex")
    assert use_flex(q)
    monkeypatch.setenv("EVATOK_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="EVATOK_ATTENTION"):
        attention_backend()


def test_tiny_tokenizer_forward_flex_equals_sdpa(monkeypatch):
    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config

    calls = _count_flex_calls(monkeypatch)
    torch.manual_seed(0)
    model = EVATokTokenizer(tokenizer_config("tiny")).to(DEVICE).eval()
    c = model.config
    video = torch.rand(2, 3, c.frames, c.height, c.width, device=DEVICE) * 2 - 1
    a = torch.tensor([[16, 1, 4, 2], [2, 8, 1, 16]], device=DEVICE)
    with torch.no_grad():
        monkeypatch.setenv("EVATOK_ATTENTION", "sdpa")
        ref = model(video, a)
        monkeypatch.setenv("EVATOK_ATTENTION", "flex")
        assert not calls
        got = model(video, a)
    # Bool-masked layers (reference, encoder self/cross, decoder self) ran flex; the decoder
    # cross-attention carries a float locality bias and stays on SDPA.
    assert len(calls) == c.patch_depth + 2 * c.enc_depth + c.dec_depth
    assert torch.equal(got.indices, ref.indices)
    torch.testing.assert_close(got.recon, ref.recon, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- CUDA only
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (compiled FlexAttention)")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_flex_dense_forward_backward_equals_sdpa(dtype):
    # Up to 4 x 128 tokens + padding: several 128 x 128 tiles, some skipped, some full, some partial.
    _, bid, _, valid = _layout(8, batch=4, extra_pad=40, levels=(8, 32, 64, 128))
    dense = block_causal_mask(bid, bid, valid, valid)
    B, L = bid.shape
    q, k, v = (t.to(dtype).requires_grad_() for t in _qkv(B, 4, L, L, dh=64, seed=9))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    grads_ref = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    got = flex.flex_attention_dense(q, k, v, dense)  # compiled on CUDA
    grads = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    rows = valid[:, None, :, None]  # padding rows are garbage by contract; compare valid rows
    torch.testing.assert_close(got * rows, ref * rows, **tol)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **{k_: 10 * v_ for k_, v_ in tol.items()})


@cuda
def test_cuda_compiled_locality_bias_gradient_reaches_the_bias():
    lengths, bid, idx, valid = _layout(10)
    pb = _patches()
    B, L, N = bid.shape[0], bid.shape[1], pb.shape[0]
    q_pos = torch.arange(N_PATCH, device=DEVICE).repeat(T)
    cover = (torch.rand(B, L, N_PATCH, generator=torch.Generator().manual_seed(11)) < 0.4).to(DEVICE)
    q, k, v = (t.requires_grad_() for t in _qkv(B, 2, N, L, dh=32, seed=12))
    bias_ref = torch.tensor(1.5, device=DEVICE, requires_grad=True)
    allowed = block_causal_mask(pb, bid, None, valid)
    dense = additive_mask(allowed, bias_ref * locality_mask(pb, q_pos, bid, cover).float())
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, bias_ref))
    bias = torch.tensor(1.5, device=DEVICE, requires_grad=True)
    bm = flex.block_mask(flex.decoder_cross(pb, bid, valid), B, N, L, device=DEVICE)
    got = flex.flex_attention(q, k, v, bm, flex.locality_bias(pb, q_pos, bid, cover, bias))
    g = torch.autograd.grad(got.square().sum(), (q, bias))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g[0], g_ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g[1], g_ref[1], atol=1e-3, rtol=1e-3)
