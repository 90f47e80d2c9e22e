"""FlexAttention masks for evatok's ragged block-causal layouts (EVATok supplementary K).

``evatok_cli.models.attention`` builds every tokenizer mask as a dense ``(B, 1, Lq, Lk)`` bool
tensor for ``scaled_dot_product_attention``. On CUDA, FlexAttention can instead run block-sparse:
tiles of the score matrix that a mask rules out entirely are skipped, and fully allowed tiles skip
the mask. This module holds

- **mask_mod factories** (torchtitan style): small named pure functions that take the per-sample
  layout tensors (block ids, valid flags, lengths) and return ``mask_mod(b, h, q_idx, kv_idx) ->
  bool``, each equal, element for element, to its dense counterpart in ``attention.py`` (fully
  masked rows included: like :func:`~evatok_cli.models.attention.attend_somewhere`, they let such
  rows see key 0, so softmax never produces NaN):

  ================================  ==========================================================
  :func:`block_causal`              any block-causal layout (= ``block_causal_mask``)
  :func:`encoder_self`              Q-Former encoder, queries -> queries (ragged, padded)
  :func:`encoder_cross`             Q-Former encoder, queries -> patches
  :func:`decoder_self`              decoder / reference layers, 3D queries -> 3D queries
  :func:`decoder_cross`             decoder, 3D queries -> 1D tokens (ragged, padded)
  :func:`padding`                   valid -> valid (= ``padding_mask``)
  :func:`causal_padded`             GPT: causal over right-padded sequences
  ================================  ==========================================================

- a **score_mod** factory, :func:`locality_bias`, for the decoder cross-attention's learned
  locality bias (dense path: ``additive_mask(allowed, bias * locality_mask(...))``);
- helpers: :func:`materialize` (mask_mod -> dense bool mask, for tests), :func:`block_mask`
  (mask_mod -> ``BlockMask``), :func:`block_mask_from_dense` (dense bool mask -> ``BlockMask``
  without re-deriving the layout) and :func:`flex_attention` / :func:`flex_attention_dense`.

Which path runs where (docs/kernels.md): ``evatok_cli.models.attention.Attention`` uses
:func:`flex_attention_dense` for **boolean** masks when ``EVATOK_ATTENTION`` selects flex (``auto``:
CUDA only). Float masks (the decoder cross-attention with its locality bias) stay on SDPA there,
because ``Attention`` only sees the dense bias; :func:`locality_bias` is the score_mod a caller that
holds the layout can pass instead. FlexAttention has no CPU backward (torch 2.13), and on CPU it
runs an unfused eager reference: the CPU default is always SDPA.
"""

from __future__ import annotations

import functools
import importlib.util
import warnings
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]

BLOCK_SIZE = 128  # FlexAttention's default sparse block (tile) size


def flex_available() -> bool:
    """True when ``torch.nn.attention.flex_attention`` exists (torch >= 2.5)."""
    try:
        return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except ModuleNotFoundError:  # pragma: no cover - torch.nn.attention itself missing
        return False


# ----------------------------------------------------------------------------------- helpers
def _at(x: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Index a (B, L) per-sample or (L,) shared layout tensor as ``f(b, i)``."""
    if x.dim() == 1:
        return lambda b, i: x[i]
    if x.dim() == 2:
        return lambda b, i: x[b, i]
    raise ValueError(f"layout tensors must be (L,) or (B, L), got shape {tuple(x.shape)}")


def _ones(like: Tensor) -> Tensor:
    return torch.ones(like.shape[-1], dtype=torch.bool, device=like.device)


# -------------------------------------------------------------------------------- mask_mods
def block_causal(
    q_block_ids: Tensor,
    kv_block_ids: Tensor,
    q_valid: Tensor | None = None,
    kv_valid: Tensor | None = None,
) -> MaskMod:
    """Query of block t attends to the valid keys of blocks <= t (= ``block_causal_mask``).

    Args:
        q_block_ids: (B, Lq) or (Lq,) block id of each query.
        kv_block_ids: (B, Lk) or (Lk,) block id of each key.
        q_valid: (B, Lq) or (Lq,) False on padding queries (they see key 0 only).
        kv_valid: (B, Lk) or (Lk,) False on padding keys (never attended).

    Returns:
        ``mask_mod(b, h, q_idx, kv_idx) -> bool``.
    """
    q_valid = _ones(q_block_ids) if q_valid is None else q_valid
    kv_valid = _ones(kv_block_ids) if kv_valid is None else kv_valid
    # A row is empty iff its query is padding or no valid key has a block <= the query's block:
    # precomputed from the smallest valid key block per sample, O(B * (Lq + Lk)), no dense mask.
    big = torch.iinfo(kv_block_ids.dtype).max
    kv_min = torch.where(kv_valid, kv_block_ids, big).amin(-1, keepdim=True)  # (B, 1) or (1,)
    empty = ~(q_valid & (kv_min <= q_block_ids))  # (B, Lq) or (Lq,) by broadcasting
    qb, kb, kv_ok, row_empty = _at(q_block_ids), _at(kv_block_ids), _at(kv_valid), _at(empty)
    qv = _at(q_valid)

    def block_causal_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = (kb(b, kv_idx) <= qb(b, q_idx)) & kv_ok(b, kv_idx) & qv(b, q_idx)
        return allowed | (row_empty(b, q_idx) & (kv_idx == 0))

    return block_causal_mod


def encoder_self(block_ids: Tensor, valid: Tensor) -> MaskMod:
    """Q-Former encoder self-attention over packed queries ((B, L) ids and valid flags)."""
    return block_causal(block_ids, block_ids, valid, valid)


def encoder_cross(block_ids: Tensor, valid: Tensor, patch_blocks: Tensor) -> MaskMod:
    """Q-Former encoder cross-attention: packed queries -> (N,) patches (all valid)."""
    return block_causal(block_ids, patch_blocks, valid)


def decoder_self(patch_blocks: Tensor) -> MaskMod:
    """Decoder (and reference-layer) self-attention among the (N,) 3D queries / patches."""
    return block_causal(patch_blocks, patch_blocks)


def decoder_cross(patch_blocks: Tensor, block_ids: Tensor, valid: Tensor) -> MaskMod:
    """Decoder cross-attention: (N,) 3D queries -> packed (B, L) tokens."""
    return block_causal(patch_blocks, block_ids, None, valid)


def padding(q_valid: Tensor, kv_valid: Tensor) -> MaskMod:
    """Valid queries attend to every valid key (= ``padding_mask``)."""
    empty = ~(q_valid & kv_valid.any(-1, keepdim=True))  # (B, Lq) or (Lq,)
    qv, kv_ok, row_empty = _at(q_valid), _at(kv_valid), _at(empty)

    def padding_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (qv(b, q_idx) & kv_ok(b, kv_idx)) | (row_empty(b, q_idx) & (kv_idx == 0))

    return padding_mod


def causal_padded(lengths: Tensor) -> MaskMod:
    """GPT batches, right-padded to a common length: key j <= query i and j < lengths[b].

    Valid queries see exactly what ``is_causal=True`` gives them (padding only ever follows them);
    padding queries see the valid prefix, so tiles made only of padding are skipped. Key 0 stays
    visible to every row, as ``attend_somewhere`` would have it for an empty sequence.

    Args:
        lengths: (B,) valid length of each sequence.
    """

    def causal_padded_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & ((kv_idx < lengths[b]) | (kv_idx == 0))

    return causal_padded_mod


# -------------------------------------------------------------------------------- score_mod
def locality_bias(
    q_block_ids: Tensor,
    q_pos: Tensor,
    kv_block_ids: Tensor,
    kv_cover: Tensor,
    bias: Tensor,
) -> ScoreMod:
    """Decoder cross-attention bias: ``score + bias`` where the key's pooling cell covers the query.

    Equals the dense path's ``additive_mask(allowed, bias * locality_mask(...))`` when combined with
    the :func:`decoder_cross` block mask (``allowed``). ``bias`` (a 0-d learned parameter) is
    captured, so its gradient flows on devices where FlexAttention has a backward (CUDA).

    Args:
        q_block_ids: (B, Lq) or (Lq,) block of each 3D query.
        q_pos: (Lq,) patch position (0..h*w-1) of each 3D query inside its block.
        kv_block_ids: (B, Lk) or (Lk,) block of each token.
        kv_cover: (B, Lk, h*w) bool, which patch positions each token's pooling cell covers.
        bias: 0-d tensor, the layer's bias.
    """
    qb, kb = _at(q_block_ids), _at(kv_block_ids)

    def locality_bias_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        local = (kb(b, kv_idx) == qb(b, q_idx)) & kv_cover[b, kv_idx, q_pos[q_idx]]
        return score + (bias * local).to(score.dtype)

    return locality_bias_mod


def dense_mask_mod(mask: Tensor) -> MaskMod:
    """mask_mod reading a dense (B or 1, 1, Lq, Lk) bool mask (the generic bridge from SDPA masks)."""
    if mask.dim() != 4 or mask.dtype != torch.bool:
        raise ValueError(f"expected a (B, 1, Lq, Lk) bool mask, got {tuple(mask.shape)} {mask.dtype}")
    if mask.shape[0] == 1:
        return lambda b, h, q_idx, kv_idx: mask[0, 0, q_idx, kv_idx]
    return lambda b, h, q_idx, kv_idx: mask[b, 0, q_idx, kv_idx]


# ---------------------------------------------------------------------------- block masks
def materialize(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device | str = "cpu") -> Tensor:
    """Evaluate a mask_mod on the full grid -> (batch, 1, q_len, kv_len) bool (tests, debugging)."""
    from torch.nn.attention.flex_attention import create_mask

    return create_mask(mask_mod, batch, 1, q_len, kv_len, device=device)


def block_mask(
    mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device: torch.device | str, block_size: int = BLOCK_SIZE
) -> Any:
    """``BlockMask`` of a mask_mod (``create_block_mask``; batch 1 broadcasts over the batch)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(mask_mod, batch, None, q_len, kv_len, device=device, BLOCK_SIZE=block_size)


def _ordered(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(..., nq, nk) bool tiles -> (count (..., nq), indices (..., nq, nk): selected tiles first, ascending)."""
    num = blocks.sum(-1, dtype=torch.int32)
    idx = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


def block_mask_from_dense(mask: Tensor, block_size: int = BLOCK_SIZE) -> Any:
    """``BlockMask`` of a dense (B or 1, 1, Lq, Lk) bool mask, in a few tensor ops (no mask_mod vmap).

    Tiles with no allowed entry are skipped, tiles with every entry allowed run without a mask,
    the rest read the (zero-padded to whole tiles) dense mask through :func:`dense_mask_mod`.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if mask.dim() != 4 or mask.dtype != torch.bool or mask.shape[1] != 1:
        raise ValueError(f"expected a (B, 1, Lq, Lk) bool mask, got {tuple(mask.shape)} {mask.dtype}")
    B, _, Lq, Lk = mask.shape
    nq, nk = -(-Lq // block_size), -(-Lk // block_size)
    padded = F.pad(mask, (0, nk * block_size - Lk, 0, nq * block_size - Lq))  # False outside
    counts = padded.reshape(B, 1, nq, block_size, nk, block_size).sum((3, 5))  # (B, 1, nq, nk)
    full = counts == block_size * block_size
    partial = (counts > 0) & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=dense_mask_mod(padded), seq_lengths=(Lq, Lk)
    )


# ------------------------------------------------------------------------------ attention
@functools.cache
def _compiled_flex() -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import flex_attention as flex

    return torch.compile(flex)


def flex_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_mask: Any = None,
    score_mod: ScoreMod | None = None,
    *,
    compiled: bool | None = None,
) -> Tensor:
    """FlexAttention of (B, H, Lq, dh) queries over (B, H, Lk, dh) keys/values -> (B, H, Lq, dh).

    Args:
        block_mask: a ``BlockMask`` (:func:`block_mask`, :func:`block_mask_from_dense`) or None.
        score_mod: e.g. :func:`locality_bias`.
        compiled: run ``torch.compile(flex_attention)`` (the fused kernel); default: on CUDA only.
            Uncompiled FlexAttention is torch's unfused reference (materialises the scores).
    """
    from torch.nn.attention.flex_attention import flex_attention as flex

    if compiled if compiled is not None else q.is_cuda:
        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask)
    with warnings.catch_warnings():  # "called without torch.compile()": intended (CPU, tests)
        warnings.filterwarnings("ignore", message=".*without torch.compile.*")
        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)


class _BlockMaskCache:
    """BlockMasks of the last few dense masks, keyed by tensor identity and version.

    The tokenizer hands the same mask tensor to every layer; converting it once per forward instead
    of once per layer keeps the conversion off the critical path. Entries hold weak references to
    the masks (a dead mask never matches; its entry is dropped at the next insertion) and match on
    identity and in-place version, so a mask edited in place is converted again.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self.entries: list[tuple[weakref.ref[Tensor], int, int, Any]] = []

    def get(self, mask: Tensor, block_size: int) -> Any:
        for ref, version, bs, bm in self.entries:
            if ref() is mask and version == mask._version and bs == block_size:
                return bm
        bm = block_mask_from_dense(mask, block_size)
        self.entries = [e for e in self.entries if e[0]() is not None][-(self.size - 1) :]
        self.entries.append((weakref.ref(mask), mask._version, block_size, bm))
        return bm


_CACHE = _BlockMaskCache()


def flex_attention_dense(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, *, block_size: int = BLOCK_SIZE, compiled: bool | None = None
) -> Tensor:
    """FlexAttention under a dense (B or 1, 1, Lq, Lk) bool mask: same result as SDPA with that mask.

    The mask is turned into a (cached) ``BlockMask`` by :func:`block_mask_from_dense`.
    """
    if torch.compiler.is_compiling():  # inside a user's torch.compile: no python-side cache
        bm = block_mask_from_dense(mask, block_size)
    else:
        bm = _CACHE.get(mask, block_size)
    return flex_attention(q, k, v, bm, compiled=compiled)


__all__ = [
    "BLOCK_SIZE",
    "block_causal",
    "block_mask",
    "block_mask_from_dense",
    "causal_padded",
    "decoder_cross",
    "decoder_self",
    "dense_mask_mod",
    "encoder_cross",
    "encoder_self",
    "flex_attention",
    "flex_attention_dense",
    "flex_available",
    "locality_bias",
    "materialize",
    "padding",
]
