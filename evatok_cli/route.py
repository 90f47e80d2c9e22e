"""Routing: from router outputs to one assignment per clip, budgets, and evaluation (EVATok §3.3, §4).

The router (``evatok_cli.models.router``) only maps pixels to m^T numbers; every policy lives here
(STYLE rule 9):

- :func:`choose_assignments`: the classify head's argmax, or for the reward head
  ``argmax_a  w_q * Q_hat(a) - w_l * Lz(a)`` (PAPER Eq. 3-5 with the predicted quality);
- :func:`budget_assignments`: the reward head under a dataset-level token budget: maximise the total
  predicted quality subject to mean tokens <= budget, by Lagrangian relaxation (bisection on the
  per-token price lambda; each clip takes ``argmax_a Q_hat(a) - lambda * L(a)``), then a greedy fill
  of the slack left between the two bracketing prices;
- :func:`evaluate`: top-1/top-5 accuracy against the searched best assignment and the paper's reward
  percentile P = (E[R(a)] - E[R(worst)]) / (E[R(best)] - E[R(worst)]) (PAPER §4, Table 8), computed
  exactly from the labels store's per-assignment metric vectors, for the router and two uniform
  baselines;
- :func:`route`: the ``evatok route`` pipeline (decode clips, run the router, choose, evaluate).

A **labels store** (written by ``evatok search``) is a token store v1 whose attrs add
``kind: "labels"`` and ``search: {metric, higher_is_better, w_q, w_l, calibration: {mean, std, ...}}``,
with per-clip extra fields ``metric`` (m^T,) (NaN where unexplored) and ``reward``; its
``assignment`` column is the best assignment. :func:`load_labels` reads one into memory.

Rewards come from ``evatok_cli.search.rewards`` (one formula for search, training and routing);
quality is oriented higher-is-better: Q = s * (metric - mean) / std with s = +1 when a higher metric
is better (PSNR), -1 otherwise (LPIPS, PAPER §3: Q = -z(LPIPS)).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.reward import NO_ASSIGNMENT, best_assignments
from evatok_cli.video import ClipReader, ClipSpec, VideoError, VideoRef, clip_key, probe, resampled_length

if TYPE_CHECKING:
    from evatok_cli.train.dist import DistEnv

log = logging.getLogger(__name__)

DEFAULT_W_Q, DEFAULT_W_L = 1.2, 0.8  # PAPER §3: the default router's weights


# ------------------------------------------------------------------------------------ labels
@dataclass
class Labels:
    """A labels store in memory: everything routing targets and evaluation need (no tokens).

    Attributes:
        space: the assignment space.
        keys, sources: per clip.
        clip_starts: (N,) int64.
        best: (N,) int64 the stored best assignment (argmax of the reward at the store's w_q, w_l).
        metric: (N, m^T) float32 clip-level metric of every assignment, NaN where unexplored.
        metric_name, higher_is_better: what the metric is (``lpips``: lower is better).
        mean, std: the quality calibration.
        w_q, w_l: the weights the search used.
        clip: ``{frames, height, width, fps}`` of the clips.
    """

    space: AssignmentSpace
    keys: list[str]
    sources: list[str]
    clip_starts: np.ndarray
    best: np.ndarray
    metric: np.ndarray
    metric_name: str
    higher_is_better: bool
    mean: float
    std: float
    w_q: float
    w_l: float
    clip: dict[str, Any]
    path: str = ""
    attrs: dict[str, Any] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.keys)

    def weights(self, w_q: float | None = None, w_l: float | None = None) -> tuple[float, float]:
        """(w_q, w_l), each defaulting to the store's."""
        return (self.w_q if w_q is None else float(w_q)), (self.w_l if w_l is None else float(w_l))

    def quality(self) -> np.ndarray:
        """(N, m^T) float64 quality z-scores Q (higher is better), NaN where unexplored."""
        return self.rewards(1.0, 0.0)

    def rewards(self, w_q: float | None = None, w_l: float | None = None) -> np.ndarray:
        """(N, m^T) float64 R = w_q * Q - w_l * Lz (``evatok_cli.search.rewards``), NaN where unexplored."""
        from evatok_cli.search import rewards

        w_q, w_l = self.weights(w_q, w_l)
        return rewards(self.metric, {"mean": self.mean, "std": self.std}, self.space, w_q, w_l, self.higher_is_better)

    def best_assignments(self, w_q: float | None = None, w_l: float | None = None) -> np.ndarray:
        """(N,) best index: the stored one at the store's weights, else the argmax recomputed from the metric."""
        w_q, w_l = self.weights(w_q, w_l)
        if (w_q, w_l) == (self.w_q, self.w_l):
            return self.best.copy()
        return best_assignments(self.rewards(w_q, w_l))  # -1 for a clip with nothing scored (evatok_cli.reward)

    def clip_spec(self) -> ClipSpec:
        c = self.clip
        return ClipSpec(frames=int(c["frames"]), height=int(c["height"]), width=int(c["width"]), fps=c.get("fps", "native"))


def load_labels(path: str | Path) -> Labels:
    """Read a labels store (the output of ``evatok search``) into memory.

    Raises:
        ValueError: not a labels store (no ``search`` attrs or no ``metric`` field).
        StoreError: not a finished store.
    """
    from evatok_cli.store import open_store

    store = open_store(path)
    attrs = store.attrs
    search = attrs.get("search")
    if attrs.get("kind") != "labels" or not isinstance(search, dict) or "metric" not in store.extra_fields:
        raise ValueError(f"{path}: not a labels store (expected kind 'labels', 'search' attrs and a 'metric' field; "
                         "make one with `evatok search`)")
    space = store.space
    dtype, shape = store.extra_fields["metric"]
    if tuple(shape) != (len(space),):
        raise ValueError(f"{path}: metric field has shape {tuple(shape)}, expected ({len(space)},) for the space")
    n = len(store)
    metric = np.empty((n, len(space)), dtype=np.float32)
    sources, starts = [], np.empty(n, dtype=np.int64)
    for i, s in enumerate(store):
        metric[i] = s.extra["metric"]
        sources.append(s.source)
        starts[i] = s.clip_start
    cal = search.get("calibration") or {}
    return Labels(
        space=space, keys=list(store.keys), sources=sources, clip_starts=starts,
        best=store.assignments().astype(np.int64), metric=metric, metric_name=str(search.get("metric", "metric")),
        higher_is_better=bool(search.get("higher_is_better", False)), mean=float(cal.get("mean", 0.0)),
        std=float(cal.get("std", 1.0)), w_q=float(search.get("w_q", DEFAULT_W_Q)), w_l=float(search.get("w_l", DEFAULT_W_L)),
        clip=dict(attrs.get("clip") or {}), path=str(path), attrs=attrs,
    )


# ----------------------------------------------------------------------------------- policies
def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def routing_scores(pred: Any, head: str, space: AssignmentSpace, w_q: float = DEFAULT_W_Q, w_l: float = DEFAULT_W_L) -> np.ndarray:
    """(B, m^T) scores whose row argmax is the routed assignment: logits (classify), or w_q*Q_hat - w_l*Lz (reward)."""
    p = _numpy(pred)
    if p.ndim != 2 or p.shape[1] != len(space):
        raise ValueError(f"predictions must be (B, {len(space)}), got {p.shape}")
    if head == "classify":
        return p
    if head == "reward":
        return w_q * p - w_l * space.lengths_z()[None, :]
    raise ValueError(f"head must be 'classify' or 'reward', got {head!r}")


def choose_assignments(pred: Any, head: str, space: AssignmentSpace, w_q: float = DEFAULT_W_Q,
                       w_l: float = DEFAULT_W_L) -> np.ndarray:
    """One assignment index per clip (deterministic: the first index wins ties).

    Args:
        pred: (B, m^T) router outputs (:meth:`Router.predict`): logits or Q_hat.
        head: ``classify`` (w_q, w_l are ignored: they were fixed when the labels were made) or
            ``reward`` (argmax of w_q * Q_hat - w_l * Lz).
        space: the router's assignment space.

    Returns:
        (B,) int64 indices into ``space``.
    """
    return np.argmax(routing_scores(pred, head, space, w_q, w_l), axis=1).astype(np.int64)


class RouterPolicy:
    """A router as an assignment policy: video (B, 3, F, H, W) in [-1, 1] -> (B, T) tokens per block.

    Used by `evatok encode --router` and `evatok train tokenizer --stage final --router`: each clip
    gets the argmax of the router's scores (logits, or w_q * Q_hat - w_l * Lz for the reward head).
    """

    def __init__(self, model: Any, space: AssignmentSpace, w_q: float, w_l: float) -> None:
        self.model, self.space, self.w_q, self.w_l = model, space, w_q, w_l
        self.table = torch.as_tensor(space.table())

    @classmethod
    def load(cls, path: str | Path, space: AssignmentSpace, clip: tuple[int, int, int], device: Any,
             *, w_q: float | None = None, w_l: float | None = None) -> RouterPolicy:
        """Load a router directory and check it matches the tokenizer's space and clip geometry."""
        from evatok_cli.checkpoint import read_model_meta
        from evatok_cli.models.router import Router
        from evatok_cli.train.checkpoints import resolve_model_dir

        path = resolve_model_dir(path)
        model = Router.from_pretrained(path, map_location=device).eval()
        c = model.config
        if model.space != space:
            raise ValueError(f"{path}: router space {model.space.to_dict()} differs from the tokenizer's {space.to_dict()}")
        if (c.frames, c.height, c.width) != tuple(clip):
            raise ValueError(f"{path}: router clips {c.frames}x{c.height}x{c.width} differ from the tokenizer's "
                             f"{clip[0]}x{clip[1]}x{clip[2]}")
        trained = read_model_meta(path).get("labels", {})
        return cls(model, space,
                   float(trained.get("w_q", DEFAULT_W_Q)) if w_q is None else float(w_q),
                   float(trained.get("w_l", DEFAULT_W_L)) if w_l is None else float(w_l))

    @torch.no_grad()
    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        idx = choose_assignments(self.model.predict(video), self.model.config.head, self.space, self.w_q, self.w_l)
        return self.table[torch.as_tensor(idx)]


def _lagrange_choice(q: np.ndarray, lengths: np.ndarray, lam: float) -> np.ndarray:
    return np.argmax(q - lam * lengths[None, :], axis=1)


def budget_assignments(q_hat: Any, space: AssignmentSpace, budget: float, *, iters: int = 60) -> tuple[np.ndarray, float]:
    """Assignments with mean tokens <= ``budget`` maximising the total predicted quality.

    Lagrangian relaxation of ``max sum_i Q_hat_i(a_i)  s.t.  mean_i L(a_i) <= budget``: for a price
    lambda >= 0 per token each clip takes ``argmax_a Q_hat_i(a) - lambda * L(a)``, whose mean length
    falls as lambda grows; bisection finds the smallest feasible price. The clips whose choice differs
    between the two bracketing prices are then upgraded greedily (best quality gain per extra token
    first) while the budget allows, so little of the budget is left unused.

    Args:
        q_hat: (N, m^T) predicted quality z-scores (the reward head's output).
        space: the assignment space (lengths L(a) in tokens).
        budget: mean tokens per clip allowed.

    Returns:
        ((N,) int64 indices, lambda: the price in quality units per token; 0 when the budget does not bind).

    Raises:
        ValueError: ``budget`` below the shortest assignment's length.
    """
    q = _numpy(q_hat)
    if q.ndim != 2 or q.shape[1] != len(space):
        raise ValueError(f"q_hat must be (N, {len(space)}), got {q.shape}")
    if budget < space.min_length:
        raise ValueError(f"budget {budget:g} tokens is below the shortest assignment ({space.min_length} tokens)")
    n = q.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0.0
    lengths = space.lengths().astype(np.float64)
    cap = budget * n

    def total(a: np.ndarray) -> float:
        return float(lengths[a].sum())

    a = _lagrange_choice(q, lengths, 0.0)
    if total(a) <= cap:
        return a.astype(np.int64), 0.0
    lo, hi = 0.0, 1.0
    while total(_lagrange_choice(q, lengths, hi)) > cap:  # at a high enough price every clip takes the shortest
        lo, hi = hi, hi * 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        if total(_lagrange_choice(q, lengths, mid)) > cap:
            lo = mid
        else:
            hi = mid
    a_hi, a_lo = _lagrange_choice(q, lengths, hi), _lagrange_choice(q, lengths, lo)
    rows = np.arange(n)
    gain = q[rows, a_lo] - q[rows, a_hi]
    cost = lengths[a_lo] - lengths[a_hi]
    cand = np.flatnonzero((a_lo != a_hi) & (cost > 0) & (gain > 0))
    order = cand[np.lexsort((cand, -(gain[cand] / cost[cand])))]
    used = total(a_hi)
    out = a_hi.copy()
    for i in order:
        if used + cost[i] <= cap:
            out[i], used = a_lo[i], used + cost[i]
    # one last pass over the slack: each clip's best upgrade that still fits, biggest gain first
    extra = lengths[None, :] - lengths[out][:, None]  # (N, M) extra tokens of every alternative
    up = np.where((extra > 0) & (extra <= cap - used), q - q[rows, out][:, None], -np.inf)
    choice = np.argmax(up, axis=1)
    g = up[rows, choice]
    for i in np.lexsort((rows, -g)):
        if not g[i] > 0:
            break
        if used + extra[i, choice[i]] <= cap:
            out[i], used = choice[i], used + extra[i, choice[i]]
    return out.astype(np.int64), float(hi)


# ---------------------------------------------------------------------------------- evaluation
def _percentile(r: np.ndarray, best: np.ndarray, worst: np.ndarray) -> float:
    ok = np.isfinite(r)
    if not ok.any():
        return float("nan")
    den = best[ok].mean() - worst[ok].mean()
    return 1.0 if den <= 0 else float((r[ok].mean() - worst[ok].mean()) / den)


def evaluate(indices: Sequence[int] | np.ndarray, labels: Labels, w_q: float | None = None, w_l: float | None = None,
             *, rows: Sequence[int] | np.ndarray | None = None, scores: np.ndarray | None = None) -> dict[str, Any]:
    """Score routed assignments against a labels store (PAPER §4, Table 8).

    Rewards R = w_q * Q - w_l * Lz are computed exactly from the stored metric vectors (default
    weights: the store's). The "best" assignment of a clip is the stored one at the store's weights
    (recomputed as the argmax of R otherwise).

    Reported reward percentiles P = (E[R(policy)] - E[R(worst)]) / (E[R(best)] - E[R(worst)]):

    - ``p_router``: the given assignments;
    - ``p_uniform_per_clip``: the best of the m uniform assignments (k, ..., k) chosen **per clip**
      with hindsight: the paper's "best-uniform" baseline (Table 8);
    - ``p_uniform_global``: the single uniform assignment with the best mean reward over the set
      (what a fixed-length tokenizer tuned on this set would use), named in ``uniform_global``.

    Clips whose assignment was not explored by the search (NaN metric) are left out of that
    policy's expectations and counted in ``unscored``.

    Args:
        indices: (N,) routed assignment indices, aligned with ``rows``.
        labels: from :func:`load_labels`.
        rows: the labels rows the indices refer to (default: all, in order).
        scores: (N, m^T) routing scores (:func:`routing_scores`) to compute top-5 accuracy.

    Returns:
        A flat dict of floats (and ``uniform_global`` as a list).
    """
    space = labels.space
    rows_ = np.arange(len(labels)) if rows is None else np.asarray(rows, dtype=np.int64)
    idx = np.asarray(indices, dtype=np.int64)
    if idx.shape != rows_.shape:
        raise ValueError(f"{idx.shape[0]} assignments for {rows_.shape[0]} label rows")
    w_q_, w_l_ = labels.weights(w_q, w_l)
    R = labels.rewards(w_q_, w_l_)[rows_]  # (N, m^T)
    best = labels.best_assignments(w_q_, w_l_)[rows_]
    n = len(rows_)
    out: dict[str, Any] = {"clips": n, "w_q": w_q_, "w_l": w_l_, "metric": labels.metric_name}
    if n == 0:
        return out
    ar = np.arange(n)
    lengths = space.lengths()
    r_best, r_worst = np.nanmax(R, axis=1), np.nanmin(R, axis=1)
    r_router = R[ar, idx]
    uni = np.array([space.to_index(space.uniform(k)) for k in space.levels])
    R_uni = R[:, uni]  # (N, m)
    b_uni = best_assignments(R_uni)  # a clip with no scored uniform keeps uniform[0]: its reward is NaN, left out
    per_clip = uni[np.where(b_uni == NO_ASSIGNMENT, 0, b_uni)]
    seen = np.isfinite(R_uni)
    col_mean = np.where(seen.any(0), np.where(seen, R_uni, 0).sum(0) / np.maximum(seen.sum(0), 1), -np.inf)
    glob = int(uni[int(np.argmax(col_mean))])
    r_per_clip, r_glob = R[ar, per_clip], R[:, glob]
    out["top1"] = float(np.mean(idx == best))
    if scores is not None:
        s = np.asarray(scores, dtype=np.float64)
        top5 = np.argsort(-s, axis=1, kind="stable")[:, :5]
        out["top5"] = float(np.mean((top5 == best[:, None]).any(1)))
    out["p_router"] = _percentile(r_router, r_best, r_worst)
    out["p_uniform_per_clip"] = _percentile(r_per_clip, r_best, r_worst)
    out["p_uniform_global"] = _percentile(r_glob, r_best, r_worst)
    out["uniform_global"] = list(space.to_tuple(glob))
    for name, r in (("router", r_router), ("best", r_best), ("worst", r_worst), ("uniform_per_clip", r_per_clip),
                    ("uniform_global", r_glob)):
        out[f"mean_reward_{name}"] = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
    metric = labels.metric[rows_].astype(np.float64)
    for name, a in (("router", idx), ("best", best), ("uniform_per_clip", per_clip), ("uniform_global", np.full(n, glob))):
        out[f"mean_tokens_{name}"] = float(lengths[a].mean())
        m = metric[ar, a]
        out[f"mean_metric_{name}"] = float(np.nanmean(m)) if np.isfinite(m).any() else float("nan")
    out["unscored"] = int((~np.isfinite(r_router)).sum())
    return out


# ------------------------------------------------------------------------ clips of a labels store
def _canonical(source: str) -> str:
    path, sep, member = source.partition("::")
    return os.path.realpath(path) + sep + member


def _name(source: str) -> str:
    return source.rpartition("::")[2].replace("\\", "/").rpartition("/")[2]


def resolve_sources(sources: Iterable[str], refs: Sequence[VideoRef]) -> dict[str, VideoRef]:
    """Map label sources to the videos given with ``--data``.

    A source matches a ref with the same source string, else the same real path (symlinks and
    relative paths resolved; tar members by tar path and member), else the same file name when
    exactly one ref has it. Unmatched sources are absent from the result.
    """
    exact = {r.source: r for r in refs}
    canon = {_canonical(r.source): r for r in refs}
    names: dict[str, list[VideoRef]] = {}
    for r in refs:
        names.setdefault(_name(r.source), []).append(r)
    out: dict[str, VideoRef] = {}
    for s in dict.fromkeys(sources):
        ref = exact.get(s) or canon.get(_canonical(s))
        if ref is None and len(names.get(_name(s), [])) == 1:
            ref = names[_name(s)][0]
        if ref is not None:
            out[s] = ref
    return out


def label_clips(labels: Labels, refs: Sequence[VideoRef], spec: ClipSpec, *, rank: int = 0,
                world_size: int = 1) -> tuple[list[tuple[int, VideoRef, int]], list[tuple[str, str]]]:
    """The labels' clips that can be read from ``refs``: ``(row, ref, clip_start)`` in source order.

    Each source is probed once; a source not found in ``refs``, unreadable, or too short for a
    clip is skipped (logged) and reported in the second list as ``(source, reason)``.

    Args:
        rank, world_size: keep only this rank's share: source ``g`` (in order of first appearance
            in the labels) belongs to rank ``g % world_size``; the other sources are not probed.
    """
    found = resolve_sources(labels.sources, refs)
    by_source: dict[str, list[int]] = {}
    for i, s in enumerate(labels.sources):
        by_source.setdefault(s, []).append(i)
    items: list[tuple[int, VideoRef, int]] = []
    skipped: list[tuple[str, str]] = []
    for g, (source, rows) in enumerate(by_source.items()):
        if g % world_size != rank:
            continue
        ref = found.get(source)
        if ref is None:
            skipped.append((source, "not found in --data"))
            continue
        try:
            info = probe(ref)
        except VideoError as e:
            skipped.append((source, e.reason))
            continue
        n_frames = resampled_length(info.frames, info.fps, spec.target_fps)
        for i in sorted(rows, key=lambda r: labels.clip_starts[r]):
            start = int(labels.clip_starts[i])
            if 0 <= start <= n_frames - spec.frames:
                items.append((i, ref, start))
            else:
                skipped.append((source, f"clip start {start} out of range ({n_frames} frames)"))
    for source, reason in skipped[:5]:
        log.warning("skipping labelled clips of %s: %s", source, reason)
    if len(skipped) > 5:
        log.warning("... and %d more skipped", len(skipped) - 5)
    return items, skipped


class LabelClipDataset:
    """Map-style dataset over ``(row, ref, start)`` items: ``{"video": uint8 (F, H, W, 3), "row", ...}``.

    Keeps the last video open (consecutive items of one source decode it once). A clip that fails to
    decode yields an item with an ``"error"`` instead (see :func:`collate_label_clips`).
    """

    def __init__(self, items: Sequence[tuple[int, VideoRef, int]], spec: ClipSpec) -> None:
        self.items = list(items)
        self.spec = spec
        self._reader: tuple[int, str, ClipReader] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def _open(self, ref: VideoRef) -> ClipReader:
        pid = os.getpid()
        if self._reader is not None and self._reader[0] == pid and self._reader[1] == ref.source:
            return self._reader[2]
        if self._reader is not None and self._reader[0] == pid:
            self._reader[2].close()
        reader = ClipReader(ref, self.spec, threads=1)
        self._reader = (pid, ref.source, reader)
        return reader

    def __getitem__(self, i: int) -> dict[str, Any]:
        row, ref, start = self.items[i]
        try:
            frames = self._open(ref).read(start).frames
        except VideoError as e:
            self._reader = None
            return {"row": row, "source": ref.source, "clip_start": start, "error": e.reason}
        import torch

        return {"video": torch.from_numpy(np.ascontiguousarray(frames)), "row": row, "source": ref.source, "clip_start": start}


def collate_label_clips(items: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(batch with ``video`` uint8 (B, F, H, W, 3), ``row`` int64 (B,), ``source``, ``clip_start``; failures)."""
    import torch

    good = [it for it in items if "error" not in it]
    bad = [it for it in items if "error" in it]
    batch = {
        "video": torch.stack([it["video"] for it in good]) if good else torch.empty((0, 0, 0, 0, 3), dtype=torch.uint8),
        "row": torch.tensor([it["row"] for it in good], dtype=torch.int64),
        "source": [it["source"] for it in good],
        "clip_start": [int(it["clip_start"]) for it in good],
    }
    return batch, bad


# ----------------------------------------------------------------------------------- pipeline
@dataclass
class RouteResult:
    """What :func:`route` returns.

    Under torchrun the clips are routed on every rank, but ``records`` and ``predictions`` are
    gathered on rank 0 only (``is_main``); the other ranks get empty ones and the same ``summary``.

    Attributes:
        records: one dict per routed clip: ``key, source, clip_start, assignment (list), index, tokens``,
            in the order of a one-process run.
        summary: ``clips, mean_tokens, head, w_q, w_l, budget, lambda, failures, world_size``
            (+ ``eval`` with --eval).
        predictions: (N, m^T) float32 router outputs, aligned with ``records``.
        is_main: this process holds the results (rank 0, or the only process).
    """

    records: list[dict[str, Any]]
    summary: dict[str, Any]
    predictions: np.ndarray
    is_main: bool = True


class _Ordered:
    """A map-style dataset whose items also carry ``order``: their place in a one-process run."""

    def __init__(self, dataset: Any, order: Sequence[tuple[int, int]]) -> None:
        self.dataset, self.order = dataset, list(order)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "order": self.order[i]}


def _ordered_collate(collate: Any, items: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    batch, bad = collate(items)  # failures keep their "order"
    batch["order"] = [it["order"] for it in items if "error" not in it]
    return batch, bad


def route(
    router: str | Path,
    data: Sequence[str],
    *,
    clips: str | int = "first",
    w_q: float | None = None,
    w_l: float | None = None,
    budget: float | None = None,
    eval_labels: str | Path | None = None,
    batch_size: int = 16,
    device: str = "auto",
    workers: int = 0,
    ema: bool = True,
    stdin=None,
) -> RouteResult:
    """Route every clip of ``data`` (``evatok route``); deterministic.

    Runs as one process or under ``torchrun`` (call it on every rank): rank r routes videos
    r, r + world, ... (with ``eval_labels``: the labels' sources, in the same way), then rank 0
    gathers every clip's prediction and chooses the assignments, so the budget and the evaluation
    cover the whole set and the result is that of a one-process run.

    Args:
        router: a router model directory, or a training output directory (its latest step).
        data: video files, directories, ``-`` (paths on stdin) or WebDataset tars.
        clips: clip policy per video (``first``, ``all`` or N evenly spaced). Ignored with
            ``eval_labels``: then the labels' own clips are routed (found in ``data``).
        w_q, w_l: reward-head trade-off (default: the weights of the labels the router was trained on,
            else the paper's 1.2 / 0.8). The classify head ignores them.
        budget: mean tokens per clip over the whole set (reward head only; :func:`budget_assignments`).
        eval_labels: a labels store: route its clips and add :func:`evaluate`'s metrics to the summary.
        batch_size: clips per forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (torchrun: one device per local rank).
        workers: DataLoader decoding workers.
        ema: use the EMA weights when the checkpoint has them.

    Returns:
        A :class:`RouteResult` (under torchrun: records and predictions on rank 0 only).

    Raises:
        ValueError: ``budget`` with a classify-head router, no clips, bad options.
    """
    import torch.distributed as dist

    from evatok_cli.train.dist import init_distributed, shutdown

    owns_group = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(device)
    try:
        return _route(env, router, data, clips=clips, w_q=w_q, w_l=w_l, budget=budget, eval_labels=eval_labels,
                      batch_size=batch_size, workers=workers, ema=ema, stdin=stdin)
    finally:
        if owns_group:
            shutdown(env)


def _route(env: DistEnv, router: str | Path, data: Sequence[str], *, clips: str | int, w_q: float | None,
           w_l: float | None, budget: float | None, eval_labels: str | Path | None, batch_size: int, workers: int,
           ema: bool, stdin: Any) -> RouteResult:
    from evatok_cli.train.dist import broadcast_object, gather_objects_to_main

    from functools import partial

    from torch.utils.data import DataLoader

    from evatok_cli.checkpoint import read_model_meta
    from evatok_cli.models.router import Router
    from evatok_cli.train.checkpoints import resolve_model_dir
    from evatok_cli.video import list_inputs, parse_clip_policy, to_model_input
    from evatok_cli.video.dataset import ClipIndexDataset, collate_clips

    path = resolve_model_dir(router)
    meta = read_model_meta(path)
    cfg_head = meta.get("config", {}).get("head")
    if budget is not None and cfg_head != "reward":
        raise ValueError(f"--budget needs a reward-head router; {path} has a {cfg_head!r} head (train one with --head reward)")
    dev = env.device
    model = Router.from_pretrained(path, ema=ema, map_location=dev).eval()
    c, space = model.config, model.space
    if c.head == "classify" and (w_q is not None or w_l is not None) and eval_labels is None and env.is_main:
        log.warning("a classify-head router fixed its trade-off at training: w_q/w_l change nothing without --eval")
    trained = meta.get("labels", {})
    w_q = float(trained.get("w_q", DEFAULT_W_Q)) if w_q is None else float(w_q)
    w_l = float(trained.get("w_l", DEFAULT_W_L)) if w_l is None else float(w_l)
    refs = list_inputs(data, stdin=stdin)
    if not refs:
        raise ValueError(f"no videos found in {', '.join(map(str, data))}")
    rank, world = env.rank, env.world_size
    labels = None
    # Every clip and failure carries an order key (group, position): group = the video's number in
    # `refs` (or the source's number in the labels), position = its place within this rank's share.
    # Sorting the gathered keys restores the order of a one-process run.
    failures: list[tuple[tuple[int, int], str, str]] = []
    if eval_labels is not None:
        labels = load_labels(eval_labels)
        if labels.space != space:
            raise ValueError(f"{eval_labels}: space {labels.space.to_dict()} differs from the router's {space.to_dict()}")
        spec = labels.clip_spec()
        group = {s: g for g, s in enumerate(dict.fromkeys(labels.sources))}
        items, skipped = label_clips(labels, refs, spec, rank=rank, world_size=world)
        failures += [((group[s], -1), s, r) for s, r in skipped]
        order = [(group[labels.sources[row]], i) for i, (row, _, _) in enumerate(items)]
        dataset: Any = LabelClipDataset(items, spec)
        collate: Any = collate_label_clips
    else:
        spec = ClipSpec(frames=c.frames, height=c.height, width=c.width, fps=meta.get("clip", {}).get("fps", "native"))
        dataset = ClipIndexDataset(refs[rank::world], spec, parse_clip_policy(clips))
        order = [(v * world + rank, i) for i, (v, _, _) in enumerate(dataset.index)]
        collate = collate_clips
    if (spec.frames, spec.height, spec.width) != (c.frames, c.height, c.width):
        raise ValueError(f"clips are {spec.frames}x{spec.height}x{spec.width} but the router takes {c.frames}x{c.height}x{c.width}")
    loader = DataLoader(_Ordered(dataset, order), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=partial(_ordered_collate, collate))
    preds = [np.zeros((0, len(space)), dtype=np.float32)]
    recs: list[dict[str, Any]] = []
    keys: list[tuple[int, int]] = []
    rows: list[int] = []
    for batch, bad in loader:
        failures += [(it["order"], it["source"], it["error"]) for it in bad]
        if batch["video"].shape[0] == 0:
            continue
        preds.append(model.predict(to_model_input(batch["video"]).to(dev)).cpu().numpy().astype(np.float32))
        starts = [int(s) for s in batch["clip_start"]]
        recs += [{"key": clip_key(s, st), "source": s, "clip_start": st} for s, st in zip(batch["source"], starts)]
        keys += batch["order"]
        if labels is not None:
            rows += batch["row"].tolist()

    mine = {"keys": keys, "recs": recs, "rows": rows, "pred": np.concatenate(preds), "failures": failures}
    parts = gather_objects_to_main(mine, env)
    summary: dict[str, Any] | None = None
    error = None
    pred = np.zeros((0, len(space)), dtype=np.float32)
    if env.is_main:
        keys = [k for p in parts for k in p["keys"]]
        perm = sorted(range(len(keys)), key=keys.__getitem__)
        recs = [r for p in parts for r in p["recs"]]
        recs = [recs[i] for i in perm]
        pred = np.concatenate([p["pred"] for p in parts])[perm]
        rows = [r for p in parts for r in p["rows"]]
        rows = [rows[i] for i in perm] if labels is not None else []
        failed = sorted((f for p in parts for f in p["failures"]), key=lambda f: f[0])  # stable: per-rank order kept
        failures_out = [{"source": s, "reason": r} for _, s, r in failed]
        if not recs:
            error = "no clip could be read" + (f" (first failure: {failures_out[0]['source']}: "
                                               f"{failures_out[0]['reason']})" if failures_out else "")
        else:
            summary = _choose(recs, pred, rows, labels, space, head=c.head, w_q=w_q, w_l=w_l, budget=budget,
                              failures=failures_out, world_size=world)
    summary, error = broadcast_object((summary, error), env)
    if error is not None:
        raise ValueError(error)
    assert summary is not None
    return RouteResult(recs if env.is_main else [], summary, pred, is_main=env.is_main)


def _choose(recs: list[dict[str, Any]], pred: np.ndarray, rows: list[int], labels: Labels | None,
            space: AssignmentSpace, *, head: str, w_q: float, w_l: float, budget: float | None,
            failures: list[dict[str, str]], world_size: int) -> dict[str, Any]:
    """Fill each record's assignment (argmax or budget) and return the summary (+ ``eval``)."""
    lam = None
    if budget is not None:
        idx, lam = budget_assignments(pred, space, budget)
    else:
        idx = choose_assignments(pred, head, space, w_q, w_l)
    lengths = space.lengths()
    for r, a in zip(recs, idx):
        r.update(assignment=list(space.to_tuple(int(a))), index=int(a), tokens=int(lengths[a]))
    summary: dict[str, Any] = {
        "clips": len(recs), "mean_tokens": float(lengths[idx].mean()), "head": head, "w_q": w_q, "w_l": w_l,
        "budget": budget, "lambda": lam, "failures": failures, "world_size": world_size,
    }
    if labels is not None:
        for r, row in zip(recs, rows):
            r["key"] = labels.keys[row]
        summary["eval"] = evaluate(idx, labels, w_q, w_l, rows=rows, scores=routing_scores(pred, head, space, w_q, w_l))
    return summary
