"""Attention over ragged, block-causal token layouts (EVATok §3.1, supplementary K).

A batch of clips, each with its own assignment a = (k_1..k_T), packs every clip's 1D tokens as
``[block 1: k_1 | block 2: k_2 | ... | padding]`` up to the batch's longest clip. Every attention in
the tokenizer is described by *block ids* (which temporal block a position belongs to) and *valid*
flags (False on padding), and the masks below are small pure functions of those tensors, each
tested against a dense reference. Masks are boolean, ``True`` = may attend, shaped
``(B, 1, Lq, Lk)`` for :func:`torch.nn.functional.scaled_dot_product_attention` (which supports
backward on CPU with boolean masks). On CUDA, boolean masks can run through FlexAttention instead
(block-sparse, same result; ``EVATOK_ATTENTION=auto|sdpa|flex``, see docs/kernels.md).

Fully-masked rows (padding queries) would make softmax produce NaN; every mask function therefore
lets such rows attend to key 0 only. Their outputs are finite garbage that no valid position ever
reads (valid queries never attend to padding keys, and losses skip padding).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evatok_kernels import flex  # a module reference: tests patch its functions


# ------------------------------------------------------------------------------------ layouts
def packed_layout(block_lengths: Tensor, max_len: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Describe the packed layout of per-clip block lengths.

    Args:
        block_lengths: (B, T) tokens per block of each clip.
        max_len: padded length L (default: the longest clip).

    Returns:
        ``(block_ids, index_in_block, valid)``, each (B, L): the block of each position, its index
        inside that block, and False on padding (where block id and index are 0).
    """
    B, T = block_lengths.shape
    ends = block_lengths.cumsum(1)  # (B, T)
    L = int(ends[:, -1].max()) if max_len is None else int(max_len)
    pos = torch.arange(L, device=block_lengths.device)
    block_ids = (pos[None, :, None] >= ends[:, None, :]).sum(-1)  # (B, L); T on padding
    valid = block_ids < T
    block_ids = torch.where(valid, block_ids, torch.zeros_like(block_ids))
    starts = ends - block_lengths  # (B, T)
    index = pos[None, :] - starts.gather(1, block_ids)
    index = torch.where(valid, index, torch.zeros_like(index))
    return block_ids, index, valid


def patch_block_ids(blocks: int, patches_per_block: int, device: torch.device | str | None = None) -> Tensor:
    """(blocks * patches_per_block,) block id of every patch / 3D query, in block-major order."""
    return torch.arange(blocks, device=device).repeat_interleave(patches_per_block)


def padding_fraction(block_lengths: Tensor) -> float:
    """Fraction of the packed (B, max length) token grid that is padding."""
    lengths = block_lengths.sum(1)
    total = lengths.numel() * int(lengths.max())
    return 1.0 - float(lengths.sum()) / total if total else 0.0


# -------------------------------------------------------------------------------------- masks
def _batched(x: Tensor) -> Tensor:
    return x if x.dim() == 2 else x.unsqueeze(0)


def attend_somewhere(allowed: Tensor) -> Tensor:
    """Give every fully-masked row of a (..., Lq, Lk) bool mask key 0 (no NaN from softmax)."""
    empty = ~allowed.any(-1, keepdim=True)  # (..., Lq, 1)
    first = torch.zeros_like(allowed)
    first[..., 0] = True
    return allowed | (empty & first)


def block_causal_mask(
    q_block_ids: Tensor,
    kv_block_ids: Tensor,
    q_valid: Tensor | None = None,
    kv_valid: Tensor | None = None,
) -> Tensor:
    """Query of block t may attend to a valid key of block <= t (supplementary K).

    Args:
        q_block_ids: (B, Lq) or (Lq,) block id of each query.
        kv_block_ids: (B, Lk) or (Lk,) block id of each key.
        q_valid: (B, Lq) or (Lq,) False on padding queries (their rows only see key 0).
        kv_valid: (B, Lk) or (Lk,) False on padding keys (never attended).

    Returns:
        (B, 1, Lq, Lk) bool, True = attend (B is 1 when every input is unbatched).
    """
    allowed = _batched(kv_block_ids)[:, None, :] <= _batched(q_block_ids)[:, :, None]  # (B, Lq, Lk)
    if kv_valid is not None:
        allowed = allowed & _batched(kv_valid)[:, None, :]
    if q_valid is not None:
        allowed = allowed & _batched(q_valid)[:, :, None]
    return attend_somewhere(allowed)[:, None]


def padding_mask(q_valid: Tensor, kv_valid: Tensor) -> Tensor:
    """Valid queries attend to every valid key; (B, 1, Lq, Lk) bool."""
    allowed = _batched(q_valid)[:, :, None] & _batched(kv_valid)[:, None, :]
    return attend_somewhere(allowed)[:, None]


def locality_mask(q_block_ids: Tensor, q_pos: Tensor, kv_block_ids: Tensor, kv_cover: Tensor) -> Tensor:
    """Query (block t, patch position j) and a key of block t whose pooling cell covers j.

    Used for the decoder's learned locality bias (docs/tokenizer.md), never to forbid attention.

    Args:
        q_block_ids: (B, Lq) or (Lq,) block of each 3D query.
        q_pos: (Lq,) patch position (0..h*w-1) of each 3D query inside its block.
        kv_block_ids: (B, Lk) or (Lk,) block of each token.
        kv_cover: (B, Lk, h*w) bool, which patch positions each token's pooling cell covers.

    Returns:
        (B, 1, Lq, Lk) bool.
    """
    same = _batched(kv_block_ids)[:, None, :] == _batched(q_block_ids)[:, :, None]  # (B, Lq, Lk)
    covers = kv_cover[:, :, q_pos].transpose(1, 2)  # (B, Lq, Lk)
    return (same & covers)[:, None]


def additive_mask(allowed: Tensor, bias: Tensor) -> Tensor:
    """Float mask for SDPA: ``bias`` where ``allowed``, -inf elsewhere (same shapes, broadcast)."""
    return torch.where(allowed, bias, torch.full((), float("-inf"), dtype=bias.dtype, device=bias.device))


# ------------------------------------------------------------------------------ backend
ATTENTION_ENV = "EVATOK_ATTENTION"


def attention_backend() -> str:
    """``EVATOK_ATTENTION``: ``auto`` (default), ``sdpa`` or ``flex`` (read at every call)."""
    mode = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "sdpa", "flex"):
        raise ValueError(f"{ATTENTION_ENV} must be auto, sdpa or flex, got {mode!r}")
    return mode


def use_flex(q: Tensor) -> bool:
    """Whether bool-masked attention of queries ``q`` runs FlexAttention instead of SDPA.

    ``sdpa``: never. ``flex``: always (on CPU only without gradients: FlexAttention has no CPU
    backward). ``auto``: on CUDA when torch has FlexAttention. Float masks always use SDPA.
    """
    mode = attention_backend()
    if mode == "sdpa" or (mode == "auto" and not q.is_cuda):
        return False

    if mode == "flex" and not flex.flex_available():
        raise RuntimeError(f"{ATTENTION_ENV}=flex but this torch has no torch.nn.attention.flex_attention")
    return flex.flex_available()


# ----------------------------------------------------------------------------------- modules
class Attention(nn.Module):
    """Multi-head attention whose keys/values are projected separately, so they can be cached.

    ``kv(context)`` projects keys and values once; ``forward(x, k, v, mask)`` attends ``x`` to
    them. Self-attention passes ``kv(x)`` (concatenated with a cache for block-wise decoding).
    """

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, dim)
        self.v = nn.Linear(kv_dim or dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, dh)

    def kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """(B, Lk, kv_dim) -> keys, values, each (B, H, Lk, head_dim)."""
        return self._split(self.k(context)), self._split(self.v(context))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """Attend (B, Lq, dim) queries to (B, H, Lk, head_dim) keys/values under a bool mask."""
        B, Lq, D = x.shape
        q = self._split(self.q(x))
        if mask is not None and mask.dtype == torch.bool and use_flex(q):
            out = flex.flex_attention_dense(q, k, v, mask)  # same result, block-sparse (docs/kernels.md)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, dh)
        return self.proj(out.transpose(1, 2).reshape(B, Lq, D))
