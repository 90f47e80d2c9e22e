"""Mask functions of evatok_cli.models.attention against dense references built by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from evatok_cli.models.attention import (
    additive_mask,
    attend_somewhere,
    block_causal_mask,
    locality_mask,
    packed_layout,
    padding_fraction,
    padding_mask,
    patch_block_ids,
)


def _layout_reference(block_lengths: list[list[int]]) -> tuple[list[list[int]], list[list[int]], list[list[bool]]]:
    L = max(sum(r) for r in block_lengths)
    bids, idxs, valids = [], [], []
    for row in block_lengths:
        b = [t for t, k in enumerate(row) for _ in range(k)]
        i = [j for k in row for j in range(k)]
        pad = L - len(b)
        bids.append(b + [0] * pad)
        idxs.append(i + [0] * pad)
        valids.append([True] * len(b) + [False] * pad)
    return bids, idxs, valids


def _dense_block_causal(qb, kb, qv, kv) -> torch.Tensor:
    B, Lq, Lk = len(qb), len(qb[0]), len(kb[0])
    m = torch.zeros(B, 1, Lq, Lk, dtype=torch.bool)
    for b in range(B):
        for i in range(Lq):
            for j in range(Lk):
                m[b, 0, i, j] = qv[b][i] and kv[b][j] and kb[b][j] <= qb[b][i]
            if not m[b, 0, i].any():
                m[b, 0, i, 0] = True
    return m


def test_packed_layout_matches_reference():
    lengths = [[16, 8, 2, 2], [1, 4, 16, 1], [2, 2, 2, 2]]
    bid, idx, valid = packed_layout(torch.tensor(lengths))
    rb, ri, rv = _layout_reference(lengths)
    assert bid.tolist() == rb and idx.tolist() == ri and valid.tolist() == rv
    bid, _, valid = packed_layout(torch.tensor(lengths), max_len=30)
    assert bid.shape == (3, 30) and not valid[:, 28:].any()


def test_paper_illustration_4x4x4_grid_assignment_16_8_2_2():
    # Supplementary K: a 4x4x4 patch grid (4 blocks of 16 patches), assignment (16, 8, 2, 2).
    a = [16, 8, 2, 2]
    qb = [t for t, k in enumerate(a) for _ in range(k)]  # 28 queries
    pb = patch_block_ids(4, 16)
    assert pb.tolist() == [t for t in range(4) for _ in range(16)]
    self_mask = block_causal_mask(torch.tensor(qb), torch.tensor(qb))
    cross_mask = block_causal_mask(torch.tensor(qb), pb)
    assert self_mask.shape == (1, 1, 28, 28) and cross_mask.shape == (1, 1, 28, 64)
    ones = [[True] * 28]
    assert torch.equal(self_mask, _dense_block_causal([qb], [qb], ones, ones))
    assert torch.equal(cross_mask, _dense_block_causal([qb], [pb.tolist()], ones, [[True] * 64]))
    # Row counts: block t's queries see the queries / patches of blocks <= t.
    assert self_mask[0, 0].sum(1).tolist() == [16] * 16 + [24] * 8 + [26] * 2 + [28] * 2
    assert cross_mask[0, 0].sum(1).tolist() == [16] * 16 + [32] * 8 + [48] * 2 + [64] * 2


def test_block_causal_mask_ragged_batch_matches_dense_reference():
    lengths = [[16, 8, 2, 2], [1, 4, 16, 1], [2, 1, 1, 1]]
    bid, _, valid = packed_layout(torch.tensor(lengths))
    rb, _, rv = _layout_reference(lengths)
    got = block_causal_mask(bid, bid, valid, valid)
    assert torch.equal(got, _dense_block_causal(rb, rb, rv, rv))
    # Queries against all-valid patches (encoder cross-attention), and patches against tokens (decoder).
    pb = patch_block_ids(4, 3)
    allp = [[True] * 12] * 3
    assert torch.equal(block_causal_mask(bid, pb, valid), _dense_block_causal(rb, [pb.tolist()] * 3, rv, allp))
    assert torch.equal(block_causal_mask(pb, bid, None, valid), _dense_block_causal([pb.tolist()] * 3, rb, allp, rv))


def test_padding_rows_attend_only_key_zero_and_never_produce_nan():
    lengths = torch.tensor([[4, 4], [1, 1]])
    bid, _, valid = packed_layout(lengths)
    mask = block_causal_mask(bid, bid, valid, valid)
    pad_rows = mask[1, 0, 2:]
    assert pad_rows[:, 0].all() and not pad_rows[:, 1:].any()
    q, k, v = (torch.randn(2, 2, 8, 4, requires_grad=True) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_padding_mask_and_attend_somewhere():
    qv = torch.tensor([[True, True, False]])
    kv = torch.tensor([[True, False, True, False]])
    m = padding_mask(qv, kv)[0, 0]
    assert m.tolist() == [[True, False, True, False], [True, False, True, False], [True, False, False, False]]
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert attend_somewhere(none).tolist() == [[True, False, False]] * 2


def test_locality_mask_and_additive_mask():
    # 2 blocks of 4 positions; tokens: block 0 has one token covering everything, block 1 two tokens.
    q_blocks, q_pos = patch_block_ids(2, 4), torch.arange(4).repeat(2)
    kv_blocks = torch.tensor([[0, 1, 1]])
    cover = torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 1, 1]]], dtype=torch.bool)
    got = locality_mask(q_blocks, q_pos, kv_blocks, cover)[0, 0]
    ref = torch.zeros(8, 3, dtype=torch.bool)
    for p in range(8):
        for j in range(3):
            ref[p, j] = bool(kv_blocks[0, j] == q_blocks[p]) and bool(cover[0, j, q_pos[p]])
    assert torch.equal(got, ref)
    add = additive_mask(torch.tensor([True, False]), torch.tensor([2.0, 2.0]))
    assert add[0] == 2.0 and add[1] == float("-inf")


def test_padding_fraction():
    assert padding_fraction(torch.tensor([[2, 2], [1, 1]])) == 0.25
    assert padding_fraction(torch.tensor([[3, 1]])) == 0.0
