"""Stage 2 of EVATok: the proxy reward and the search for each clip's best assignment (PAPER §3).

**Reward.** For a clip and an assignment a = (k_1..k_T), the proxy tokenizer reconstructs the clip
and a metric scores each block of the reconstruction; the *clip metric* M(a) is the mean of the T
per-block values (blocks have equal frames, so it equals the per-frame mean). Then

    R(a) = w_q * Q(a) - w_l * L(a),   Q(a) = s * (M(a) - mean) / std,   L(a) = lengths_z(a)

with s = +1 when higher is better (PSNR, SSIM) and s = -1 otherwise (LPIPS: the sign the paper's
Eq. 6 lost in extraction), mean/std the *calibration* of M over random (clip, assignment) pairs,
and L the length z-scored exactly over the uniform assignment space (:class:`AssignmentSpace`).
:func:`rewards` is a pure function of stored metric vectors, so rewards for other weights can be
recomputed from a labels store without the proxy.

**Exact search (prefix tree).** Both tokenizer halves are block-causal: block t's pixels depend
only on (k_1..k_t). Level t of the tree holds the m^t prefixes; each node runs *one* block
(``encode_block`` + ``decode_block`` from its parent's cached state, :class:`BlockwiseCodec`) and
scores that block against the target. M(a) is the mean of the block values along a's path. Cost:
m + m^2 + ... + m^T block evaluations per clip (780 for m=5, T=4) instead of T * m^T = 2500 for
decoding every assignment whole (:func:`brute_force_search`, the reference). The tree is walked
depth-first in steps of at most ``chunk`` branches, so memory stays bounded by ~T chunks of prefix
states whatever the batch size. Near the root a step expands every branch by all m levels at once;
deeper, a step gives all its branches the *same* level, so no branch is padded to a larger k
(a mixed step runs every branch's new block at the largest k of the step). The last block (the
m^T leaves, most of the work) runs every level of up to ``chunk`` parents in one pass
(``BlockwiseCodec.step_levels``): the m children attend to their parent's cached prefix instead of
each copying it, and no child state is built.

**Beam search** (``width`` W) keeps the W best prefixes of each clip per level. A prefix is ranked
by the reward of its *neutral completion*: the remaining blocks are assumed to score the calibration
mean and to get the mean level's length. Because every prefix of a level shares the same number of
remaining blocks, this is the prefix's own partial reward
``w_q*s*sum_{u<=t}(v_u - mean)/(T*std) - w_l*sum_{u<=t}(k_u - mean_level)/std_L`` (v_u the block
metric values) and the ranking
does not depend on which fixed completion one assumes. Unexplored assignments get NaN; a W of at
least m^(T-1) explores the whole tree (= exact).

**Datasets.** :func:`search_dataset` runs the search over videos and writes a *labels store* (a
token store v1, docs/formats.md and docs/pipeline.md "Search"), one sample per clip, sharded over
torchrun ranks by video, resumable, deterministic.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.metrics import Metric, get_metric
from evatok_cli.models.blockwise import BlockwiseCodec, PrefixState
from evatok_cli.models.tokenizer import EVATokTokenizer, TokenizerConfig
from evatok_cli.store.lock import acquire as acquire_store_lock

if TYPE_CHECKING:
    from evatok_cli.train.dist import DistEnv

log = logging.getLogger(__name__)

CALIBRATION_STREAM = 0xCA1  # mixed into the seed of the calibration draws
DEFAULT_CHUNK_BYTES = 1 << 30  # prefix-state budget of one search call on CPU
CPU_CHUNK = 128  # most branches per block step on CPU


# ------------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class CalibrationStats:
    """Mean and std of the clip metric over random (clip, assignment) pairs (PAPER §3.2, Eq. 6).

    Attributes:
        mean, std: of the clip metric (population std).
        count: pairs that went into them.
        seed: seed of the draw.
        metric: metric name ("psnr", "ssim", "lpips").
        proxy_sha256: sha256 of the proxy's weights (``weights_sha256``), or None if unknown.
    """

    mean: float
    std: float
    count: int
    seed: int
    metric: str = ""
    proxy_sha256: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std)) or self.std <= 0:
            raise ValueError(f"calibration needs a finite mean and a positive std, got {self.mean}, {self.std}")

    def attrs(self) -> dict[str, Any]:
        """The ``search.calibration`` attrs of a labels store."""
        return {"mean": float(self.mean), "std": float(self.std), "count": int(self.count), "seed": int(self.seed)}

    def to_dict(self) -> dict[str, Any]:
        """The ``--stats`` file content."""
        return {"metric": self.metric, **self.attrs(), "proxy_sha256": self.proxy_sha256}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        """Read a ``--stats`` JSON file, or the calibration of an existing labels store."""
        path = Path(path)
        if path.is_dir():
            from evatok_cli.store import open_store

            attrs = open_store(path, allow_unfinished=True).attrs
            if "search" not in attrs:
                raise ValueError(f"{path} is a token store without search attrs (not a labels store)")
            c = attrs["search"]["calibration"]
            return cls(float(c["mean"]), float(c["std"]), int(c["count"]), int(c["seed"]),
                       attrs["search"]["metric"], attrs.get("tokenizer", {}).get("sha256"))
        try:
            d = json.loads(path.read_text())
            return cls(float(d["mean"]), float(d["std"]), int(d["count"]), int(d.get("seed", 0)),
                       str(d.get("metric", "")), d.get("proxy_sha256"))
        except FileNotFoundError:
            raise ValueError(f"--stats {path}: no such file") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"--stats {path}: not a calibration file (need metric, mean, std, count, seed): {e}") from None


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


# ------------------------------------------------------------------------------------- reward
def rewards(
    metric_values: np.ndarray | Tensor | Sequence[float],
    stats: CalibrationStats | Mapping[str, float],
    space: AssignmentSpace,
    w_q: float,
    w_l: float,
    higher_is_better: bool,
) -> np.ndarray:
    """Proxy rewards R = w_q*Q - w_l*L of clip metric vectors (PAPER §3.2, Eq. 3-7).

    Args:
        metric_values: (..., m**T) clip metric of every assignment in index order (NaN stays NaN).
        stats: calibration with ``mean`` and ``std`` (a :class:`CalibrationStats` or a mapping).
        space: the assignment space (its exact length z-scores give L).
        w_q, w_l: quality and length weights.
        higher_is_better: orientation of the metric (True for PSNR/SSIM, False for LPIPS).

    Returns:
        float64 array of the shape of ``metric_values``.
    """
    m = metric_values.detach().cpu().numpy() if isinstance(metric_values, Tensor) else metric_values
    m = np.asarray(m, dtype=np.float64)
    if m.shape[-1:] != (len(space),):
        raise ValueError(f"metric vectors must end with {len(space)} assignments, got shape {m.shape}")
    mean, std = (stats.mean, stats.std) if isinstance(stats, CalibrationStats) else (stats["mean"], stats["std"])
    if not std > 0:
        raise ValueError(f"calibration std must be > 0, got {std}")
    q = (m - float(mean)) / float(std)
    if not higher_is_better:
        q = -q
    return float(w_q) * q - float(w_l) * space.lengths_z()


def best_assignments(reward: np.ndarray) -> np.ndarray:
    """(N, m**T) rewards -> (N,) int64 index of the best explored assignment (ties: lowest index)."""
    r = np.asarray(reward, dtype=np.float64)
    if np.isnan(r).all(axis=-1).any():
        raise ValueError("a clip has no scored assignment")
    return np.nanargmax(r, axis=-1).astype(np.int64)


# ------------------------------------------------------------------------------------- search
def _resolve_metric(metric: Metric | str) -> Metric:
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
    floats = (c.dec_depth * 2 * T * (n + kmax) * c.dec_width + c.enc_depth * 2 * T * kmax * c.enc_width
              + n * c.dec_width * (c.mlp_ratio + 4) + 2 * c.frames // T * c.height * c.width * 3)
    chunk = budget_bytes // (4 * floats * (T + 1))
    if device.type != "cuda":
        chunk = min(chunk, CPU_CHUNK)
    return int(max(m, min(1 << 16, chunk)) // m * m)


def _block_target(video: Tensor, t: int, pt: int, clip: Tensor) -> Tensor:
    """Block t of each branch's clip: (B', 3, pt, H, W)."""
    return video[:, :, t * pt : (t + 1) * pt].index_select(0, clip)


def _expand(codec: BlockwiseCodec, state: PrefixState, parents: Tensor, video: Tensor, metric: Metric,
            levels: Tensor) -> tuple[PrefixState, Tensor, Tensor]:
    """Branches ``parents`` x every level of block ``state.t`` -> (children, k, block metric), each (P*m,)."""
    t, pt = state.t, codec.model.config.temporal_patch
    child = state.index_select(parents.repeat_interleave(len(levels)))  # one gather, m children each
    k = levels.repeat(len(parents))
    child, _, pixels = codec.step(child, k)
    values = metric(pixels, _block_target(video, t, pt, child.enc.clip), pt)[:, 0]
    return child, k, values.double()


@torch.no_grad()
def exact_search(model: EVATokTokenizer, video: Tensor, metric: Metric | str, *,
                 chunk: int | None = None) -> SearchResult:
    """Clip metric of all m**T assignments of each clip by the prefix tree (see the module doc).

    Args:
        model: the proxy tokenizer (eval mode).
        video: (B, 3, F, H, W) in [-1, 1], on the model's device.
        metric: a block metric (``get_metric(name)``) or its name.
        chunk: at most this many branches per block step (default :func:`default_chunk`).

    Returns:
        A :class:`SearchResult`; ``stats.block_evals`` = B * (m + m^2 + ... + m^T).
    """
    metric = _resolve_metric(metric)
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
                (acc[rows, None] + values.view(P, m)).flatten() / T)

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
    descend(codec.init(video), torch.zeros(B, dtype=torch.long, device=dev),
            torch.zeros(B, dtype=torch.float64, device=dev))
    return SearchResult(out.cpu(), stats)


@torch.no_grad()
def beam_search(model: EVATokTokenizer, video: Tensor, metric: Metric | str, *, width: int,
                calibration: CalibrationStats | Mapping[str, float], w_q: float = 1.2, w_l: float = 0.8,
                chunk: int | None = None) -> SearchResult:
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
    metric = _resolve_metric(metric)
    space = model.config.space
    m, T = space.num_levels, space.blocks
    mean, std = ((calibration.mean, calibration.std) if isinstance(calibration, CalibrationStats)
                 else (calibration["mean"], calibration["std"]))
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
                score = (w_q * sign * (acc - (t + 1) * mean) / (T * std)
                         - w_l * (length - (t + 1) * mean_level) / len_std)
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
def brute_force_search(model: EVATokTokenizer, video: Tensor, metric: Metric | str, *,
                       chunk: int = 128) -> SearchResult:
    """Reference: decode every assignment of every clip whole and score it (T * m**T blocks per clip).

    Pairs are processed shortest assignment first, so that a forward pass pads little.

    Args:
        model, video, metric: as :func:`exact_search`.
        chunk: (clip, assignment) pairs per forward pass.
    """
    metric = _resolve_metric(metric)
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


# -------------------------------------------------------------------------------- calibration
class _CalibrationClips(Dataset):
    """Pair i -> a random clip of video ``videos[i]`` (seeded by (seed, i)), or its error."""

    def __init__(self, refs: Sequence[Any], spec: Any, videos: np.ndarray, seed: int, pairs: Sequence[int]) -> None:
        self.refs, self.spec, self.videos, self.seed, self.pairs = list(refs), spec, videos, seed, list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> dict[str, Any]:
        from evatok_cli.video import VideoError, read_clips

        i = self.pairs[j]
        rng = np.random.default_rng([self.seed, CALIBRATION_STREAM, 1, i])
        try:
            clip = read_clips(self.refs[int(self.videos[i])], self.spec, policy="random", seed=rng)[0]
        except VideoError as e:
            return {"pair": i, "error": str(e)}
        return {"pair": i, "video": torch.from_numpy(np.ascontiguousarray(clip.frames))}


def _collate_pairs(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def calibrate(model: EVATokTokenizer, refs: Sequence[Any], spec: Any, metric: Metric | str, *, count: int = 2000,
              seed: int = 0, batch_size: int = 8, workers: int = 0, rank: int = 0, world_size: int = 1,
              proxy_sha256: str | None = None) -> CalibrationStats:
    """Mean/std of the clip metric over ``count`` random (clip, assignment) pairs.

    Pair i draws a video and an assignment uniformly with ``default_rng([seed, CALIBRATION_STREAM])``
    and a random clip of that video with ``default_rng([seed, CALIBRATION_STREAM, 1, i])``. Under
    torchrun every rank computes pairs i = rank, rank + world, ... and all values are gathered in
    pair order, so every rank ends with the same statistics (call it on all ranks). Pairs whose
    video cannot be read are left out (``count`` is the number used).
    """
    import torch.distributed as dist

    from evatok_cli.video.dataset import to_model_input

    if count < 2:
        raise ValueError(f"calibration needs at least 2 pairs, got {count}")
    if not refs:
        raise ValueError("calibration needs at least one video")
    metric = _resolve_metric(metric)
    space, pt, dev = model.config.space, model.config.temporal_patch, next(model.parameters()).device
    rng = np.random.default_rng([seed, CALIBRATION_STREAM])
    videos = rng.integers(len(refs), size=count)
    assign = torch.as_tensor(space.table()[rng.integers(len(space), size=count)])
    ds = _CalibrationClips(refs, spec, videos, seed, range(rank, count, world_size))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate_pairs)
    mine: list[tuple[int, float]] = []
    skipped: dict[str, int] = {}  # error -> pairs lost to it
    with torch.no_grad():
        for items in loader:
            good = [it for it in items if "error" not in it]
            for it in items:
                if "error" in it:
                    skipped[it["error"]] = skipped.get(it["error"], 0) + 1
            if not good:
                continue
            pairs = [it["pair"] for it in good]
            video = to_model_input(torch.stack([it["video"] for it in good])).to(dev)
            values = metric(reconstruct(model, video, assign[pairs].to(dev)), video, pt).double().mean(1)
            mine.extend(zip(pairs, values.cpu().tolist()))
    for error, n in skipped.items():
        log.warning("calibration: %d pair(s) skipped: %s", n, error)
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, mine)
        mine = [p for part in gathered for p in part]
    values = np.array([v for _, v in sorted(mine)], dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"calibration: only {len(values)} of {count} pairs could be read")
    name = getattr(metric, "name", "")
    return CalibrationStats(float(values.mean()), float(values.std()), int(len(values)), int(seed), name, proxy_sha256)


# ------------------------------------------------------------------------------------ datasets
@dataclass
class SearchSummary:
    """What :func:`search_dataset` did (the same on every rank; counts are job totals)."""

    out: str
    format: str
    clips: int = 0  # clips searched by this run
    resumed: int = 0  # clips an earlier run already stored (or inputs it recorded as failed)
    failures: int = 0  # inputs that failed in this run (recorded in the store, not retried on resume)
    failed: list[dict[str, str]] = field(default_factory=list)  # {source, reason} of those
    mean_best_tokens: float = 0.0  # over the clips searched by this run
    wall_s: float = 0.0
    search_s: float = 0.0
    calibration_s: float = 0.0
    clips_per_s: float = 0.0
    block_evals_per_clip: float = 0.0
    nothing_to_do: bool = False
    world_size: int = 1
    beam: int | None = None
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def labels_attrs(model: EVATokTokenizer, model_dir: str | Path, spec: Any, metric: Metric, *, w_q: float,
                 w_l: float, calibration: CalibrationStats, beam: int | None) -> dict[str, Any]:
    """Store attrs of a labels store: the proxy's standard attrs (``encode.store_attrs``) + ``kind`` + ``search``."""
    from evatok_cli.encode import store_attrs

    search: dict[str, Any] = {
        "metric": metric.name, "higher_is_better": bool(metric.higher_is_better), "w_q": float(w_q),
        "w_l": float(w_l), "calibration": calibration.attrs(), "beam": None if beam is None else int(beam),
    }
    if getattr(metric, "net", None):
        search["metric_net"] = metric.net  # LPIPS backbone (vgg / alex)
    return store_attrs(model, Path(model_dir), spec, {"kind": "labels", "search": search})


def _stored_attrs(path: Path) -> dict[str, Any] | None:
    from evatok_cli.store import StoreError, detect_format, open_store

    try:
        if detect_format(path) is None:
            return None
        return open_store(path, allow_unfinished=True).attrs
    except (StoreError, OSError, ValueError, KeyError):
        return None


def _reusable_calibration(attrs: dict[str, Any] | None, metric: str, sha256: str, seed: int,
                          count: int) -> CalibrationStats | None:
    """The calibration of an earlier run of the same search into the same store (resume)."""
    if not attrs or attrs.get("kind") != "labels" or "search" not in attrs:
        return None
    s = attrs["search"]
    c = s.get("calibration", {})
    if s.get("metric") != metric or attrs.get("tokenizer", {}).get("sha256") != sha256 or c.get("seed") != seed:
        return None
    if int(c["count"]) != count:
        log.info("resuming with the store's calibration (%d pairs used of the %d asked)", c["count"], count)
    return CalibrationStats(float(c["mean"]), float(c["std"]), int(c["count"]), int(c["seed"]), metric, sha256)


def _check_stats(stats: CalibrationStats, metric: str, sha256: str) -> None:
    if stats.metric and stats.metric != metric:
        raise ValueError(f"--stats were computed for metric {stats.metric!r}, this search uses {metric!r}")
    if stats.proxy_sha256 and stats.proxy_sha256 != sha256:
        raise ValueError("--stats were computed with another proxy tokenizer (weights sha256 differs)")


def search_dataset(
    tokenizer: str | Path,
    data: Sequence[str],
    out: str | Path,
    *,
    format: str = "zarr",
    metric: str | Metric = "psnr",
    metric_options: dict[str, Any] | None = None,
    w_q: float = 1.2,
    w_l: float = 0.8,
    calibration: int = 2000,
    stats: str | Path | CalibrationStats | None = None,
    beam: int | None = None,
    clips: str | int = "first",
    fps: str | float | None = None,
    batch_size: int = 8,
    workers: int = 2,
    chunk: int | None = None,
    seed: int = 0,
    device: str = "auto",
    stdin: IO[str] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> SearchSummary:
    """Search the best assignment of every clip of ``data`` with a proxy tokenizer; write a labels store.

    Args:
        tokenizer: the proxy's model directory (or a training output dir: its latest step).
        data: video files, directories, WebDataset tars or ``-`` (paths on ``stdin``).
        out: the labels store (created, or resumed when it holds an unfinished run of the same search).
        format: "zarr" or "wds".
        metric: "psnr", "ssim", "lpips" or a metric object; ``metric_options`` go to ``get_metric``
            (LPIPS: ``net``, ``backbone``, ``heads`` paths).
        w_q, w_l: reward weights (paper default 1.2 / 0.8).
        calibration: random (clip, assignment) pairs for the metric's mean/std.
        stats: a calibration file / :class:`CalibrationStats` / labels store to take mean/std from.
        beam: beam width, or None for the exact search.
        clips: clip policy per video: "first", "all", "random" or N.
        fps: clip frame rate; default the proxy's training rate (``clip_fps`` in its config.json).
        batch_size: clips per search call; workers: DataLoader decoding workers.
        chunk: branches per block step (default :func:`default_chunk`).
        seed: seeds calibration draws and the "random" clip policy.
        device: "auto", "cpu", "cuda", "cuda:N" (torchrun: one device per local rank).
        on_progress: called with (clips done, clips to do) on this rank after every batch.

    Returns:
        The job's :class:`SearchSummary`.

    Raises:
        ValueError: bad arguments, no videos, unusable calibration. StoreError: ``out`` holds
        something else (another search, another format or world size). CheckpointError: bad proxy.
    """
    import torch.distributed as dist

    from evatok_cli.train.dist import init_distributed, shutdown
    from evatok_cli.video import parse_clip_policy

    if format not in ("zarr", "wds"):
        raise ValueError(f"format must be zarr or wds, got {format!r}")
    if beam is not None and beam < 1:
        raise ValueError(f"--beam must be >= 1, got {beam}")
    if batch_size < 1 or workers < 0 or (chunk is not None and chunk < 1):
        raise ValueError("batch_size and chunk must be >= 1, workers >= 0")
    if stats is None and calibration < 2:
        raise ValueError(f"--calibration needs at least 2 pairs, got {calibration}")
    policy = parse_clip_policy(clips)
    owns_group = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(device)
    try:
        with acquire_store_lock(out, rank=env.rank):  # one writer per store: refused before calibrating
            return _search(env, tokenizer, data, Path(out), fmt=format, metric=metric, metric_options=metric_options,
                           w_q=w_q, w_l=w_l, calibration=calibration, stats=stats, beam=beam, policy=policy, fps=fps,
                           batch_size=batch_size, workers=workers, chunk=chunk, seed=seed, stdin=stdin,
                           on_progress=on_progress)
    finally:
        if owns_group:
            shutdown(env)


def _search(env: DistEnv, tokenizer: str | Path, data: Sequence[str], out: Path, *, fmt: str, metric: str | Metric,
            metric_options: dict[str, Any] | None, w_q: float, w_l: float, calibration: int,
            stats: str | Path | CalibrationStats | None, beam: int | None, policy: Any, fps: str | float | None,
            batch_size: int, workers: int, chunk: int | None, seed: int, stdin: IO[str] | None,
            on_progress: Callable[[int, int], None] | None) -> SearchSummary:
    from evatok_cli.train.dist import all_gather_objects, broadcast_object

    from evatok_cli.checkpoint import read_model_meta, weights_sha256
    from evatok_cli.store import Sample, open_store, open_writer
    from evatok_cli.train.checkpoints import resolve_model_dir
    from evatok_cli.video import ClipSpec, absolute_source, clip_key, list_inputs
    from evatok_cli.video.dataset import ClipIndexDataset, collate_clips, to_model_input

    t0 = time.perf_counter()
    model_dir = resolve_model_dir(tokenizer)
    meta = read_model_meta(model_dir)
    if meta.get("stage") not in (None, "proxy"):
        log.warning("%s is a %r tokenizer; the search is meant for a proxy tokenizer", model_dir, meta.get("stage"))
    model = EVATokTokenizer.from_pretrained(model_dir, map_location=env.device).eval()
    sha = weights_sha256(model_dir)
    config, space = model.config, model.config.space
    spec = ClipSpec(frames=config.frames, height=config.height, width=config.width,
                    fps=fps if fps is not None else meta.get("clip_fps", "native"))
    met = get_metric(metric, **(metric_options or {})) if isinstance(metric, str) else metric
    if isinstance(met, torch.nn.Module):
        met = met.to(env.device)
    refs = list_inputs(data, stdin=stdin)
    if not refs:
        raise ValueError(f"no videos found in {', '.join(map(str, data))}")

    # Calibration: a --stats file, the store's own (resume), or computed collectively.
    t_cal = time.perf_counter()
    if stats is not None:
        calib = stats if isinstance(stats, CalibrationStats) else CalibrationStats.load(stats)
        _check_stats(calib, met.name, sha)
    else:
        calib = broadcast_object(_reusable_calibration(_stored_attrs(out), met.name, sha, seed, calibration), env)
        if calib is None:
            calib = calibrate(model, refs, spec, met, count=calibration, seed=seed, batch_size=batch_size,
                              workers=workers, rank=env.rank, world_size=env.world_size, proxy_sha256=sha)
            log.info("calibration: %s mean %.6g std %.6g over %d pairs", met.name, calib.mean, calib.std, calib.count)
    calibration_s = time.perf_counter() - t_cal
    attrs = labels_attrs(model, model_dir, spec, met, w_q=w_q, w_l=w_l, calibration=calib, beam=beam)

    summary = SearchSummary(out=str(out), format=fmt, world_size=env.world_size, beam=beam,
                            calibration={"metric": met.name, **calib.attrs()}, calibration_s=calibration_s)
    writer = open_writer(out, format=fmt, attrs=attrs, num_blocks=space.blocks, rank=env.rank,
                         world_size=env.world_size, barrier=env.barrier if env.distributed else None,
                         extra_fields={"metric": ("float32", (len(space),)), "reward": ("float32", ())})
    # This rank's share: videos rank, rank + world, ...; skip what an earlier run committed.
    ds = ClipIndexDataset(refs[env.rank :: env.world_size], spec, policy, seed)
    todo, resumed = [], 0
    for i, (v, start, _err) in enumerate(ds.index):
        source = ds.refs[v].source
        if clip_key(source, max(start, 0)) in writer.done_keys or source in writer.failed_sources:
            resumed += 1  # done, or failed in an earlier run (recorded once, not retried)
        else:
            todo.append(i)
    if writer.finished:
        # More inputs into a finished labels store append as new parts; all ranks decide together.
        if not any(all_gather_objects(bool(todo), env)):
            writer.close()
            summary.nothing_to_do, summary.resumed = True, len(open_store(out))
            log.info("%s is already finished; nothing to do", out)
            summary.wall_s = time.perf_counter() - t0
            return summary
        writer.start_append()
    loader = DataLoader(Subset(ds, todo), batch_size=batch_size, num_workers=workers, collate_fn=collate_clips)
    work = SearchStats()
    tokens_sum, done, failed = 0, 0, []
    lengths = space.lengths()
    t_search = time.perf_counter()
    with writer:
        for batch, failures in loader:
            for f in failures:
                if f["source"] not in writer.failed_sources:
                    writer.add_failure(f["source"], f["error"])
                    failed.append({"source": f["source"], "reason": f["error"]})
            if batch["key"]:
                video = to_model_input(batch["video"]).to(env.device)
                if beam is None:
                    res = exact_search(model, video, met, chunk=chunk)
                else:
                    res = beam_search(model, video, met, width=beam, calibration=calib, w_q=w_q, w_l=w_l, chunk=chunk)
                metric_np = res.metric.numpy()
                reward = rewards(metric_np, calib, space, w_q, w_l, met.higher_is_better)
                best = best_assignments(reward)
                table = torch.as_tensor(space.table()[best], device=env.device)
                tokens, _ = model.encode(video, table)
                writer.append([
                    Sample(key=key, tokens=tok.cpu().numpy(), block_lengths=space.to_tuple(int(a)), assignment=int(a),
                           source=src, clip_start=int(start), label=-1, source_path=absolute_source(src),
                           extra={"metric": metric_np[j].astype(np.float32), "reward": np.float32(reward[j, a])})
                    for j, (key, src, start, a, tok) in enumerate(
                        zip(batch["key"], batch["source"], batch["clip_start"].tolist(), best, tokens))
                ])
                work.clips += res.stats.clips
                work.block_evals += res.stats.block_evals
                tokens_sum += int(lengths[best].sum())
            done += len(batch["key"]) + len(failures)
            if on_progress is not None:
                on_progress(done, len(todo))
    search_s = time.perf_counter() - t_search

    mine = {"clips": work.clips, "evals": work.block_evals, "tokens": tokens_sum, "resumed": resumed,
            "failed": failed, "search_s": search_s}
    parts = all_gather_objects(mine, env)
    clips_total = sum(p["clips"] for p in parts)
    summary.clips = clips_total
    summary.resumed = sum(p["resumed"] for p in parts)
    summary.failed = [f for p in parts for f in p["failed"]]
    summary.failures = len(summary.failed)
    summary.mean_best_tokens = sum(p["tokens"] for p in parts) / clips_total if clips_total else 0.0
    summary.search_s = max(p["search_s"] for p in parts)
    summary.clips_per_s = clips_total / summary.search_s if summary.search_s > 0 else 0.0
    summary.block_evals_per_clip = sum(p["evals"] for p in parts) / clips_total if clips_total else 0.0
    summary.wall_s = time.perf_counter() - t0
    if clips_total == 0 and summary.resumed == 0 and summary.failed:
        first = summary.failed[0]
        raise ValueError(f"no valid input: all {summary.failures} inputs failed (first: {first['source']}: "
                         f"{first['reason']})")
    return summary


__all__ = [
    "CalibrationStats",
    "SearchResult",
    "SearchStats",
    "SearchSummary",
    "beam_search",
    "best_assignments",
    "brute_force_search",
    "calibrate",
    "default_chunk",
    "exact_search",
    "labels_attrs",
    "reconstruct",
    "rewards",
    "search_dataset",
]
