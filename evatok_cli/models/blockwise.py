"""Prefix states for block-by-block encoding and decoding (DESIGN §1: exact prefix-tree search).

Both tokenizer halves are block-causal, so block t's tokens and pixels depend only on the clip's
pixels of blocks <= t and on (k_1..k_t). A *prefix state* caches what later blocks need from the
blocks done so far (per-layer keys/values); the tokenizer's ``encode_block`` / ``decode_block``
advance it by one block. States are batched along their first dimension, and ``index_select`` /
``repeat_interleave`` turn B prefixes into B' branches, e.g. ``state.repeat_interleave(m)`` before
trying the m levels of the next block; ``narrow`` takes a run of branches without copying. All
rows of a state are at the same block t.

:class:`BlockwiseCodec` bundles the two halves: ``init(video)`` then ``step(state, k)`` per block, and
``step_levels(state, levels)`` for a last block tried at every level at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import Tensor

S = TypeVar("S")


def _rows(state: S, fn: Callable[[Tensor], Tensor], shared: tuple[str, ...]) -> S:
    """``state`` with ``fn`` applied to every per-branch tensor (each layer's, for cache tuples)."""
    changes = {}
    for f in dataclasses.fields(state):  # type: ignore[arg-type]
        if f.name not in shared:
            v = getattr(state, f.name)
            changes[f.name] = tuple(fn(x) for x in v) if isinstance(v, tuple) else fn(v)
    return dataclasses.replace(state, **changes)  # type: ignore[type-var]


def _select(state: S, index: Tensor, shared: tuple[str, ...]) -> S:
    return _rows(state, lambda x: x.index_select(0, index), shared)


def _narrowed(state: S, start: int, length: int, shared: tuple[str, ...]) -> S:
    return _rows(state, lambda x: x.narrow(0, start, length), shared)


def _repeat_index(n: int, repeats: int | Tensor, device: torch.device) -> Tensor:
    return torch.arange(n, device=device).repeat_interleave(repeats if isinstance(repeats, int) else repeats.to(device))


# Caches are tuples with one tensor per layer: a block step concatenates each layer's cache with the
# block's new keys/values (attention needs them contiguous) and keeps that result as the new cache, so
# no second copy stacks the layers.
@dataclass(frozen=True)
class EncoderState:
    """Encoder prefix state of B branches over C distinct clips, after ``t`` blocks.

    Attributes:
        ref: (C, N, D_enc) reference (patch) features of each clip, all T blocks (shared).
        ref_k: per Q-Former layer, (C, H, N, dh) cross-attention keys of ``ref`` (shared).
        ref_v: same, values.
        clip: (B,) which clip (row of ``ref``) each branch encodes.
        self_k: per Q-Former layer, (B, H, L, dh) self-attention keys of the prefix queries.
        self_v: same, values.
        valid: (B, L) False on padding (branches with shorter prefixes).
        block_lengths: (B, t) tokens given to each finished block.
    """

    ref: Tensor
    ref_k: tuple[Tensor, ...]
    ref_v: tuple[Tensor, ...]
    clip: Tensor
    self_k: tuple[Tensor, ...]
    self_v: tuple[Tensor, ...]
    valid: Tensor
    block_lengths: Tensor

    _SHARED = ("ref", "ref_k", "ref_v")

    @property
    def t(self) -> int:
        """Number of blocks already encoded (= index of the next block)."""
        return int(self.block_lengths.shape[1])

    def __len__(self) -> int:
        return int(self.clip.shape[0])

    def index_select(self, index: Tensor) -> EncoderState:
        """Branches ``index`` (B',) of this state (clip features stay shared, not copied)."""
        return _select(self, index.to(self.clip.device), self._SHARED)

    def narrow(self, start: int, length: int) -> EncoderState:
        """Branches ``start .. start + length - 1`` as views (nothing copied)."""
        return _narrowed(self, start, length, self._SHARED)

    def repeat_interleave(self, repeats: int | Tensor) -> EncoderState:
        """Each branch repeated ``repeats`` times in place (``[0,0,1,1,..]`` for 2)."""
        return self.index_select(_repeat_index(len(self), repeats, self.clip.device))


@dataclass(frozen=True)
class DecoderState:
    """Decoder prefix state of B branches after ``t`` blocks.

    Attributes:
        self_k: per decoder layer, (B, H, t*h*w, dh) self-attention keys of the prefix's 3D queries.
        self_v: same, values.
        tok_k: per decoder layer, (B, H, L, dh) cross-attention keys of the prefix's 1D tokens.
        tok_v: same, values.
        tok_valid: (B, L) False on padding.
        block_lengths: (B, t) tokens of each finished block.
    """

    self_k: tuple[Tensor, ...]
    self_v: tuple[Tensor, ...]
    tok_k: tuple[Tensor, ...]
    tok_v: tuple[Tensor, ...]
    tok_valid: Tensor
    block_lengths: Tensor

    @property
    def t(self) -> int:
        return int(self.block_lengths.shape[1])

    def __len__(self) -> int:
        return int(self.block_lengths.shape[0])

    def index_select(self, index: Tensor) -> DecoderState:
        return _select(self, index.to(self.tok_valid.device), ())

    def narrow(self, start: int, length: int) -> DecoderState:
        return _narrowed(self, start, length, ())

    def repeat_interleave(self, repeats: int | Tensor) -> DecoderState:
        return self.index_select(_repeat_index(len(self), repeats, self.tok_valid.device))


@dataclass(frozen=True)
class PrefixState:
    """Encoder and decoder prefix states of the same B branches."""

    enc: EncoderState
    dec: DecoderState

    @property
    def t(self) -> int:
        return self.enc.t

    def __len__(self) -> int:
        return len(self.enc)

    def index_select(self, index: Tensor) -> PrefixState:
        return PrefixState(self.enc.index_select(index), self.dec.index_select(index))

    def narrow(self, start: int, length: int) -> PrefixState:
        """Branches ``start .. start + length - 1`` as views (nothing copied)."""
        return PrefixState(self.enc.narrow(start, length), self.dec.narrow(start, length))

    def repeat_interleave(self, repeats: int | Tensor) -> PrefixState:
        return PrefixState(self.enc.repeat_interleave(repeats), self.dec.repeat_interleave(repeats))


class BlockwiseModel(Protocol):
    """What :class:`BlockwiseCodec` needs of a tokenizer (``EVATokTokenizer`` has it): its block steps.

    A protocol, not the class, so that the tokenizer (which builds these states) and this module
    do not import each other.
    """

    def encode_prefix_init(self, video: Tensor) -> EncoderState: ...
    def decode_prefix_init(self, batch: int) -> DecoderState: ...
    def encode_block(self, state: EncoderState, k: Tensor | int) -> tuple[EncoderState, Tensor]: ...
    def decode_block(self, state: DecoderState, tokens: Tensor, k: Tensor | int) -> tuple[DecoderState, Tensor]: ...
    def encode_block_levels(self, state: EncoderState, levels: Tensor | tuple[int, ...]) -> Tensor: ...
    def decode_block_levels(self, state: DecoderState, tokens: Tensor, levels: Tensor | tuple[int, ...]) -> Tensor: ...


class BlockwiseCodec:
    """Encode-then-decode one block at a time; what the exact prefix-tree search drives.

    Example::

        codec = BlockwiseCodec(model)
        state = codec.init(video)                       # B clips, t = 0
        state = state.repeat_interleave(m)              # m branches per clip
        k = torch.tensor(levels).repeat(B)              # (B*m,) tokens for block 0
        state, tokens, pixels = codec.step(state, k)    # pixels: (B*m, 3, pt, H, W)
    """

    def __init__(self, model: BlockwiseModel) -> None:
        self.model = model

    @torch.no_grad()
    def init(self, video: Tensor) -> PrefixState:
        """Prefix states (t = 0) of a (B, 3, F, H, W) video batch."""
        return PrefixState(self.model.encode_prefix_init(video), self.model.decode_prefix_init(video.shape[0]))

    @torch.no_grad()
    def step(self, state: PrefixState, k: Tensor | int) -> tuple[PrefixState, Tensor, Tensor]:
        """Advance every branch by block ``state.t`` with k tokens.

        Returns:
            ``(state, tokens, pixels)``: the advanced state, (B, max k) int64 token ids (-1 past
            each branch's k) and (B, 3, pt, H, W) reconstructed frames of the block.
        """
        enc, tokens = self.model.encode_block(state.enc, k)
        dec, pixels = self.model.decode_block(state.dec, tokens, k)
        return PrefixState(enc, dec), tokens, pixels

    @torch.no_grad()
    def step_levels(self, state: PrefixState, levels: Tensor | tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Block ``state.t`` of every branch with every level, in one pass; no child states.

        The same numbers as ``step`` on ``state.repeat_interleave(m)`` with ``levels`` repeated, but
        the m children share their parent's cached prefix instead of copying it: the exact search's
        last block (the leaves of the prefix tree, m^T of its m + ... + m^T block evaluations).

        Returns:
            ``(tokens, pixels)``: (B, sum(levels)) int64 token ids, level after level, and
            (B, m, 3, pt, H, W) reconstructed frames of the block, one per level.
        """
        tokens = self.model.encode_block_levels(state.enc, levels)
        return tokens, self.model.decode_block_levels(state.dec, tokens, levels)
