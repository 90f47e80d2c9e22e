"""Frame prediction (video continuation): the conditioning prefix (EVATok §4.1, PAPER §6 "K600 frame prediction").

The condition is a clip's first P temporal blocks, encoded by the tokenizer with a **fixed prefix
assignment**; the GPT sequence of those blocks (length tokens and visual tokens) is teacher-forced
and the remaining T - P blocks are sampled (``evatok_cli.sampling.generate(prefix=...)``). Because
the tokenizer is block-causal, the prefix's tokens depend on the first P blocks' frames only, so
they are exactly the first ``sum(prefix assignment)`` tokens of the clip encoded with any
assignment that starts with the prefix assignment.

What lives here, shared by ``evatok train gpt --prefix-blocks``, ``evatok generate --prefix`` and
``evatok eval gen`` on a frame-prediction protocol:

- :func:`prefix_assignment`: the fixed block lengths of the prefix from a spec (``paper``, ``max``
  or ``k1,...,kP``);
- :func:`pad_condition` and :func:`read_condition`: the condition frames of a clip, padded to the
  prefix blocks by repeating the last real frame (the paper pads 5 frames to 8; how is not stated);
- :func:`encode_prefix`: the prefix tokens of a batch of clips;
- :func:`prefix_record` / :func:`gpt_prefix`: what a GPT model directory records about its prefix
  training (``config.json`` field ``prefix``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from evatok_cli.video import ClipReader, ClipSpec, VideoSource

PAPER = "paper"
MAX = "max"
DEFAULT_PREFIX_ASSIGNMENT = PAPER
DEFAULT_PREFIX_BLOCKS = 2  # PAPER §6: 5 condition frames padded to 8 frames = 2 blocks of 4


def prefix_assignment(spec: str | Sequence[int] | None, levels: Sequence[int], prefix_blocks: int) -> tuple[int, ...]:
    """The fixed block lengths of a P-block prefix.

    Args:
        spec: ``paper`` (default): the paper's (512, 128) pattern mapped to the space by rank: every
            prefix block at the largest level except the last, which takes the level two below the
            largest (512 and 128 in the paper's {32..512}; 16 and 4 in the ``tiny`` {1..16}; the
            smallest level if there are fewer than 3). ``max``: every prefix block at the largest
            level. ``k1,...,kP`` (or a sequence): explicit levels.
        levels: the assignment space's levels, ascending.
        prefix_blocks: P >= 1.

    Raises:
        ValueError: P < 1, a value that is not a level, or a count other than P.
    """
    levels = [int(k) for k in levels]
    if prefix_blocks < 1:
        raise ValueError(f"prefix blocks must be >= 1, got {prefix_blocks}")
    spec = DEFAULT_PREFIX_ASSIGNMENT if spec is None else spec
    if isinstance(spec, str) and spec.strip().lower() == PAPER:
        return (levels[-1],) * (prefix_blocks - 1) + (levels[max(len(levels) - 3, 0)],)
    if isinstance(spec, str) and spec.strip().lower() == MAX:
        return (levels[-1],) * prefix_blocks
    if isinstance(spec, str):
        try:
            values = [int(v) for v in spec.replace(" ", "").split(",") if v]
        except ValueError:
            raise ValueError(f"prefix assignment must be paper, max or k1,...,kP; got {spec!r}") from None
    else:
        values = [int(v) for v in spec]
    if len(values) != prefix_blocks:
        raise ValueError(f"prefix assignment {values} has {len(values)} blocks, the prefix has {prefix_blocks}")
    bad = [k for k in values if k not in levels]
    if bad:
        raise ValueError(f"prefix assignment holds non-levels {bad}; levels are {levels}")
    return tuple(values)


def prefix_blocks_for(cond_frames: int, temporal_patch: int) -> int:
    """Blocks that hold ``cond_frames`` condition frames (PAPER §6: 5 frames, 4 per block -> 2)."""
    return math.ceil(int(cond_frames) / int(temporal_patch))


def pad_condition(frames: np.ndarray, real: int) -> np.ndarray:
    """A copy of ``frames`` (F, H, W, 3) whose frames from ``real`` on repeat frame ``real - 1``."""
    if not 1 <= real <= frames.shape[0]:
        raise ValueError(f"condition frames must be in [1, {frames.shape[0]}], got {real}")
    out = np.array(frames, copy=True)
    out[real:] = out[real - 1]
    return out


def read_condition(source: VideoSource, spec: ClipSpec, real: int, start: int = 0) -> np.ndarray:
    """uint8 (F, H, W, 3): the clip of ``source`` at ``start`` (tokenizer geometry), padded after ``real`` frames.

    Raises:
        VideoError: the video cannot be read or is shorter than one clip.
    """
    with ClipReader(source, spec) as reader:
        frames = reader.read(int(start)).frames
    return pad_condition(frames, real)


@torch.no_grad()
def encode_prefix(
    tokenizer: Any, video: torch.Tensor, assignment: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefix tokens of each clip: B pairs (tokens (sum(assignment),) long, block lengths (P,) long) on the CPU.

    The clips are encoded with ``assignment`` followed by the smallest level for the other blocks;
    the tokenizer is block-causal, so the first P blocks' tokens do not depend on that choice.

    Args:
        tokenizer: an :class:`~evatok_cli.models.tokenizer.EVATokTokenizer`.
        video: (B, 3, F, H, W) in [-1, 1].
        assignment: the prefix block lengths (P,), P <= T.
    """
    space = tokenizer.space
    P = len(assignment)
    if not 1 <= P <= space.blocks:
        raise ValueError(f"a prefix of {P} blocks does not fit {space.blocks} blocks")
    full = list(assignment) + [space.levels[0]] * (space.blocks - P)
    a = torch.tensor([full] * video.shape[0], dtype=torch.long)
    tokens, _ = tokenizer.encode(video, a)
    n, bl = sum(int(k) for k in assignment), torch.tensor([int(k) for k in assignment], dtype=torch.long)
    return [(t[:n].long().cpu(), bl.clone()) for t in tokens]


def prefix_record(prefix_blocks: int, assignment: Sequence[int]) -> dict[str, Any]:
    """The ``prefix`` field a GPT trained on prefixed sequences records."""
    return {"blocks": int(prefix_blocks), "assignment": [int(k) for k in assignment]}


def gpt_prefix(meta: dict[str, Any]) -> tuple[int, tuple[int, ...]] | None:
    """(prefix blocks, prefix assignment) a GPT model directory records, or None (trained without a prefix)."""
    rec = meta.get("prefix")
    if not rec:
        return None
    return int(rec["blocks"]), tuple(int(k) for k in rec["assignment"])


def resolve_prefix(
    meta: dict[str, Any], levels: Sequence[int], prefix_blocks: int, spec: str | Sequence[int] | None
) -> tuple[tuple[int, ...], str | None]:
    """The prefix block lengths to sample a GPT with, and how they differ from its training.

    ``spec`` None takes the GPT's own prefix when it was trained over ``prefix_blocks`` blocks (else
    :func:`prefix_assignment`'s default). Returns ``(assignment, mismatch)``: ``mismatch`` is None
    when the GPT was trained with exactly this prefix, else one line saying how it differs.

    Raises:
        ValueError: a bad ``spec`` (from :func:`prefix_assignment`).
    """
    trained = gpt_prefix(meta)
    if spec is None and trained is not None and trained[0] == prefix_blocks:
        spec = trained[1]
    fixed = prefix_assignment(spec, levels, prefix_blocks)
    if trained is None:
        return fixed, "the GPT records no prefix training (evatok train gpt --prefix-blocks)"
    if trained != (prefix_blocks, fixed):
        return fixed, (
            f"the GPT was trained with the prefix {trained[1]} over {trained[0]} blocks, "
            f"sampled with {fixed} over {prefix_blocks}"
        )
    return fixed, None


__all__ = [
    "DEFAULT_PREFIX_ASSIGNMENT",
    "DEFAULT_PREFIX_BLOCKS",
    "MAX",
    "PAPER",
    "encode_prefix",
    "gpt_prefix",
    "pad_condition",
    "prefix_assignment",
    "prefix_blocks_for",
    "prefix_record",
    "resolve_prefix",
    "read_condition",
]
