"""The search itself: clip metric of every assignment by the prefix tree, a beam, or brute force.

See :mod:`evatok_cli.search` for the method (block-causal prefix tree, chunked steps, beam ranking
by neutral completion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from evatok_cli.metrics import Metric, get_metric
from evatok_cli.models.blockwise import BlockwiseCodec, PrefixState
from evatok_cli.models.tokenizer import EVATokTokenizer, TokenizerConfig
from evatok_cli.reward import DEFAULT_W_L, DEFAULT_W_Q, CalibrationStats

DEFAULT_CHUNK_BYTES = 1 << 30  # prefix-state budget of one search call on CPU


CPU_CHUNK = 128  # most branches per block step on CPU


@dataclass
class SearchStats:
    """Work done by a search call."""

    clips: int = 0
    block_evals: int = 0  # one block encoded + decoded + scored (a whole-clip decode counts T)

    @property
    def block_evals_per_clip(self) -> float:
        return self.block_evals / self.clips if self.clips else 0.0


@dataclass
class SearchResult:
    """Clip metric of every assignment: ``metric`` (B, m**T) float64 in index order, NaN where skipped."""

    metric: Tensor
    stats: SearchStats


def resolve_metric(metric: Metric | str) -> Metric:
    return get_metric(metric) if isinstance(metric, str) else metric


def default_chunk(config: TokenizerConfig, device: torch.device | str = "cpu", budget_bytes: int | None = None) -> int:
    """Branches per block step for ``device``, a multiple of m.

    On CUDA: as many as keep ~T live chunks of prefix states within ``budget_bytes`` (default a
    quarter of the device's free memory). The estimate counts the cached keys/values of a
    full-depth branch (decoder 3D queries and 1D tokens, encoder queries) plus one block of
    activations, in float32. On CPU: the same estimate with a 1 GiB budget, capped at
    ``CPU_CHUNK`` branches, past which larger steps only add memory traffic (measured on tiny
    and small: 125 beats 625 by 1.3-2.5x).
    """
    device = torch.device(device)
    m = len(config.levels)
    if budget_bytes is None:
        budget_bytes = torch.cuda.mem_get_info(device)[0] // 4 if device.type == "cuda" else DEFAULT_CHUNK_BYTES
    c, T, n, kmax = config, config.blocks, config.patches_per_block, config.levels[-1]
    floats = (
        c.dec_depth * 2 * T * (n + kmax) * c.dec_width
        + c.enc_depth * 2 * T * kmax * c.enc_width
        + n * c.dec_width * (c.mlp_ratio + 4)
        + 2 * c.frames // T * c.height * c.width * 3
    )
    chunk = budget_bytes // (4 * floats * (T + 1))
    if device.type != "cuda":
        chunk = min(chunk, CPU_CHUNK)
    return int(max(m, min(1 << 16, chunk)) // m * m)


def _block_target(video: Tensor, t: int, pt: int, clip: Tensor) -> Tensor:
    """Block t of each branch's clip: (B', 3, pt, H, W)."""
    return video[:, :, t * pt : (t + 1) * pt].index_select(0, clip)


def _expand(
    codec: BlockwiseCodec, state: PrefixState, parents: Tensor, video: Tensor, metric: Metric, levels: Tensor
) -> tuple[PrefixState, Tensor, Tensor]:
    """Branches ``parents`` x every level of block ``state.t`` -> (children, k, block metric), each (P*m,)."""
    t, pt = state.t, codec.model.config.temporal_patch
    child = state.index_select(parents.repeat_interleave(len(levels)))  # one gather, m children each
    k = levels.repeat(len(parents))
    child, _, pixels = codec.step(child, k)
    values = metric(pixels, _block_target(video, t, pt, child.enc.clip), pt)[:, 0]
    return child, k, values.double()


@torch.no_grad()
def exact_search(
    model: EVATokTokenizer, video: Tensor, metric: Metric | str, *, chunk: int | None = None
) -> SearchResult:
    """Clip metric of all m**T assignments of each clip by the prefix tree (see the module doc).

    Args:
        model: the proxy tokenizer (eval mode).
        video: (B, 3, F, H, W) in [-1, 1], on the model's device.
        metric: a block metric (``get_metric(name)``) or its name.
        chunk: at most this many branches per block step (default :func:`default_chunk`).

    Returns:
        A :class:`SearchResult`; ``stats.block_evals`` = B * (m + m^2 + ... + m^T).
    """
    metric = resolve_metric(metric)
    space, pt = model.config.space, model.config.temporal_patch
    m, T = space.num_levels, space.blocks
    B, dev = video.shape[0], video.device
    chunk = max(m, chunk or default_chunk(model.config, dev))
    levels = torch.tensor(space.levels, device=dev)
    digits = torch.arange(m, device=dev)
    out = torch.full((B, len(space)), math.nan, dtype=torch.float64, device=dev)
    stats = SearchStats(clips=B)
    codec = BlockwiseCodec(model)

    def record(child: PrefixState, c_prefix: Tensor, c_acc: Tensor) -> None:
        if child.t == T:
            out[child.enc.clip, c_prefix] = c_acc / T
        else:
            descend(child, c_prefix, c_acc)

    def leaves(state: PrefixState, prefix: Tensor, acc: Tensor) -> None:
        # The last block: each step tries every level of up to `chunk` parents in one pass that
        # shares the parents' prefixes (no copies, no padding, no child states; step_levels).
        n = len(state)
        for s in range(0, n, chunk):
            part = state if n <= chunk else state.narrow(s, min(chunk, n - s))  # views, no copy
            P = len(part)
            _, pixels = codec.step_levels(part, levels)  # (P, m, 3, pt, H, W)
            target = _block_target(video, T - 1, pt, part.enc.clip.repeat_interleave(m))
            values = metric(pixels.flatten(0, 1), target, pt)[:, 0].double()  # (P*m,) parent-major
            stats.block_evals += P * m
            rows = slice(s, s + P)
            out[part.enc.clip.repeat_interleave(m), (prefix[rows, None] * m + digits).flatten()] = (
                acc[rows, None] + values.view(P, m)
            ).flatten() / T

    def descend(state: PrefixState, prefix: Tensor, acc: Tensor) -> None:
        n = len(state)
        if state.t == T - 1:
            leaves(state, prefix, acc)
            return
        if n * m <= chunk:  # few branches (top of the tree): every branch x every level in one step
            child, k, values = _expand(codec, state, torch.arange(n, device=dev), video, metric, levels)
            stats.block_evals += len(k)
            record(child, prefix.repeat_interleave(m) * m + digits.repeat(n), acc.repeat_interleave(m) + values)
            return
        # Many branches: steps of up to `chunk` parents, one level at a time. A step whose branches
        # all get the same k pads nothing (a mixed step runs every branch at the largest k).
        for s in range(0, n, chunk):
            idx = torch.arange(s, min(s + chunk, n), device=dev)
            part = state if len(idx) == n else state.narrow(s, len(idx))  # views, no copy
            target = _block_target(video, part.t, pt, part.enc.clip)  # the same for every level
            for j, k in enumerate(space.levels):
                child, _, pixels = codec.step(part, k)
                values = metric(pixels, target, pt)[:, 0].double()
                stats.block_evals += len(idx)
                record(child, prefix[idx] * m + j, acc[idx] + values)
                del child

    video = video.contiguous()
    descend(
        codec.init(video), torch.zeros(B, dtype=torch.long, device=dev), torch.zeros(B, dtype=torch.float64, device=dev)
    )
    return SearchResult(out.cpu(), stats)


@torch.no_grad()
def beam_search(
    model: EVATokTokenizer,
    video: Tensor,
    metric: Metric | str,
    *,
    width: int,
    calibration: CalibrationStats | Mapping[str, float],
    w_q: float = DEFAULT_W_Q,
    w_l: float = DEFAULT_W_L,
    chunk: int | None = None,
) -> SearchResult:
    """Approximate search keeping the ``width`` best prefixes per clip and level (module doc).

    Args:
        model, video, metric, chunk: as :func:`exact_search`.
        width: beam width W >= 1; W >= m**(T-1) explores every assignment.
        calibration: mean/std of the clip metric (ranks prefixes by their partial reward).
        w_q, w_l: reward weights.

    Returns:
        A :class:`SearchResult` with NaN for the assignments the beam never reached.
    """
    if width < 1:
        raise ValueError(f"beam width must be >= 1, got {width}")
    metric = resolve_metric(metric)
    space = model.config.space
    m, T = space.num_levels, space.blocks
    mean, std = (
        (calibration.mean, calibration.std)
        if isinstance(calibration, CalibrationStats)
        else (calibration["mean"], calibration["std"])
    )
    sign = 1.0 if metric.higher_is_better else -1.0
    len_std = space.length_std or 1.0
    mean_level = float(np.mean(space.levels))
    B, dev = video.shape[0], video.device
    levels = torch.tensor(space.levels, device=dev)
    digits = torch.arange(m, device=dev)
    widest = min(width, m ** (T - 1)) * m  # most branches one clip holds at once
    group = max(1, max(m, chunk or default_chunk(model.config, dev)) // widest)
    out = torch.full((B, len(space)), math.nan, dtype=torch.float64, device=dev)
    stats = SearchStats(clips=B)
    codec = BlockwiseCodec(model)
    video = video.contiguous()
    for g0 in range(0, B, group):
        vg = video[g0 : g0 + group]
        G = vg.shape[0]
        state = codec.init(vg)
        prefix = torch.zeros(G, dtype=torch.long, device=dev)
        acc = torch.zeros(G, dtype=torch.float64, device=dev)
        length = torch.zeros(G, dtype=torch.float64, device=dev)
        for t in range(T):
            n_par = len(state)
            state, k, values = _expand(codec, state, torch.arange(n_par, device=dev), vg, metric, levels)
            stats.block_evals += len(k)
            prefix = prefix.repeat_interleave(m) * m + digits.repeat(n_par)
            acc = acc.repeat_interleave(m) + values
            length = length.repeat_interleave(m) + k.double()
            per = len(state) // G  # branches are grouped by clip, in clip order
            if t == T - 1:
                out[g0 + state.enc.clip, prefix] = acc / T
            elif per > width:
                score = (
                    w_q * sign * (acc - (t + 1) * mean) / (T * std) - w_l * (length - (t + 1) * mean_level) / len_std
                )
                best = torch.sort(score.view(G, per), dim=1, descending=True, stable=True).indices[:, :width]
                keep = (best.sort(dim=1).values + torch.arange(G, device=dev)[:, None] * per).flatten()
                state = state.index_select(keep)
                prefix, acc, length = prefix[keep], acc[keep], length[keep]
    return SearchResult(out.cpu(), stats)


@torch.no_grad()
def reconstruct(model: EVATokTokenizer, video: Tensor, assignments: Tensor) -> Tensor:
    """Whole-clip encode + decode of each clip with its own (B, T) assignment -> (B, 3, F, H, W)."""
    tokens, lengths = model.encode(video, assignments)
    return model.decode(tokens, lengths)


@torch.no_grad()
def brute_force_search(
    model: EVATokTokenizer, video: Tensor, metric: Metric | str, *, chunk: int = 128
) -> SearchResult:
    """Reference: decode every assignment of every clip whole and score it (T * m**T blocks per clip).

    Pairs are processed shortest assignment first, so that a forward pass pads little.

    Args:
        model, video, metric: as :func:`exact_search`.
        chunk: (clip, assignment) pairs per forward pass.
    """
    metric = resolve_metric(metric)
    space = model.config.space
    N, pt, dev = len(space), model.config.temporal_patch, video.device
    B = video.shape[0]
    table = torch.as_tensor(space.table(), device=dev)
    out = torch.empty(B * N, dtype=torch.float64, device=dev)
    # (clip, assignment) pairs shortest first, so a forward pass pads little
    order = torch.as_tensor(np.argsort(np.tile(space.lengths(), B), kind="stable"), device=dev)
    for s in range(0, B * N, chunk):
        idx = order[s : s + chunk]
        v = video.index_select(0, idx // N)
        out[idx] = metric(reconstruct(model, v, table[idx % N]), v, pt).double().mean(1)
    return SearchResult(out.view(B, N).cpu(), SearchStats(clips=B, block_evals=B * N * space.blocks))
