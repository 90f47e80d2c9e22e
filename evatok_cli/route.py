"""The ``evatok route`` job: route every clip of a dataset, and score a router against labels (EVATok §3.3, §4).

- :func:`route`: decode clips, run the router, choose one assignment per clip with the policies of
  :mod:`evatok_cli.assign` (argmax or a token budget), optionally evaluate against a labels store;
- :func:`evaluate`: top-1/top-5 accuracy against the searched best assignment and the paper's reward
  percentile P = (E[R(a)] - E[R(worst)]) / (E[R(best)] - E[R(worst)]) (PAPER §4, Table 8), computed
  exactly from the labels store's per-assignment metric vectors, for the router and two uniform
  baselines.

Labels stores are read by :mod:`evatok_cli.labels`; rewards come from :mod:`evatok_cli.reward` (one
formula for search, training and routing).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from evatok_cli.assign import budget_assignments, choose_assignments, open_router, routing_scores
from evatok_cli.assignments import AssignmentSpace
from evatok_cli.checkpoint import OpenModel
from evatok_cli.labels import LabelClipDataset, Labels, collate_label_clips, label_clips, load_labels
from evatok_cli.reward import nanargmax_rows, reward_weights
from evatok_cli.runtime import DistEnv, broadcast_object, gather_objects_to_main, process_group
from evatok_cli.video import ClipSpec, VideoRef, clip_key, list_inputs, parse_clip_policy, to_model_input
from evatok_cli.video.dataset import ClipIndexDataset, collate_clips

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- evaluation
def _percentile(r: np.ndarray, best: np.ndarray, worst: np.ndarray) -> float:
    ok = np.isfinite(r)
    if not ok.any():
        return float("nan")
    den = best[ok].mean() - worst[ok].mean()
    return 1.0 if den <= 0 else float((r[ok].mean() - worst[ok].mean()) / den)


def evaluate(
    indices: Sequence[int] | np.ndarray,
    labels: Labels,
    w_q: float | None = None,
    w_l: float | None = None,
    *,
    rows: Sequence[int] | np.ndarray | None = None,
    scores: np.ndarray | None = None,
) -> dict[str, Any]:
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
    per_clip = uni[nanargmax_rows(R_uni)]
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
    for name, r in (
        ("router", r_router),
        ("best", r_best),
        ("worst", r_worst),
        ("uniform_per_clip", r_per_clip),
        ("uniform_global", r_glob),
    ):
        out[f"mean_reward_{name}"] = float(np.nanmean(r)) if np.isfinite(r).any() else float("nan")
    metric = labels.metric[rows_].astype(np.float64)
    for name, a in (
        ("router", idx),
        ("best", best),
        ("uniform_per_clip", per_clip),
        ("uniform_global", np.full(n, glob)),
    ):
        out[f"mean_tokens_{name}"] = float(lengths[a].mean())
        m = metric[ar, a]
        out[f"mean_metric_{name}"] = float(np.nanmean(m)) if np.isfinite(m).any() else float("nan")
    out["unscored"] = int((~np.isfinite(r_router)).sum())
    return out


# ------------------------------------------------------------------------ clips of a labels store


# ----------------------------------------------------------------------------------- pipeline
@dataclass
class RouteResult:
    """What :func:`route` returns.

    Under torchrun the clips are routed on every rank, but ``records`` and ``predictions`` are
    gathered on rank 0 only (``is_main``); the other ranks get empty ones and the same ``summary``.

    Attributes:
        records: one dict per routed clip: ``key, source, clip_start, assignment (list), index, tokens``,
            in the order of a one-process run.
        summary: ``clips, mean_tokens, head, w_q, w_l, budget, lambda, failures, world_size, routers``
            (the router directories; several for an ensemble) (+ ``eval`` with --eval).
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
    router: str | Path | Sequence[str | Path],
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
        router: a router model directory, or a training output directory (its latest step); several:
            an ensemble of reward-head routers of one labels setup, their predictions averaged
            (:func:`evatok_cli.assign.open_router`).
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
    with process_group(device) as env:
        opened = open_router(router, device=env.device, ema=ema)
        model, space, c = opened.model, opened.model.space, opened.model.config
        if budget is not None and c.head != "reward":
            raise ValueError(
                f"--budget needs a reward-head router; {opened.dir} has a {c.head!r} head (train one with --head reward)"
            )
        if c.head == "classify" and (w_q is not None or w_l is not None) and eval_labels is None and env.is_main:
            log.warning("a classify-head router fixed its trade-off at training: w_q/w_l change nothing without --eval")
        w_q, w_l = reward_weights(w_q, w_l, opened.meta.get("labels"))
        refs = list_inputs(data, stdin=stdin)
        if not refs:
            raise ValueError(f"no videos found in {', '.join(map(str, data))}")
        labels = load_labels(eval_labels) if eval_labels is not None else None
        if labels is not None and labels.space != space:
            raise ValueError(
                f"{eval_labels}: space {labels.space.to_dict()} differs from the router's {space.to_dict()}"
            )
        dataset, collate, failures = _routed_clips(labels, refs, opened, clips, env)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            num_workers=workers,
            collate_fn=partial(_ordered_collate, collate),
        )
        mine = {"keys": [], "recs": [], "rows": [], "pred": [np.zeros((0, len(space)), dtype=np.float32)]}
        for batch, bad in loader:
            failures += [(it["order"], it["source"], it["error"]) for it in bad]
            if batch["video"].shape[0] == 0:
                continue
            pred = model.predict(to_model_input(batch["video"]).to(env.device))
            mine["pred"].append(pred.cpu().numpy().astype(np.float32))
            starts = [int(s) for s in batch["clip_start"]]
            mine["recs"] += [
                {"key": clip_key(s, st), "source": s, "clip_start": st} for s, st in zip(batch["source"], starts)
            ]
            mine["keys"] += batch["order"]
            if labels is not None:
                mine["rows"] += batch["row"].tolist()
        mine["pred"], mine["failures"] = np.concatenate(mine["pred"]), failures
        parts = gather_objects_to_main(mine, env)
        summary, error, recs, pred = None, None, [], np.zeros((0, len(space)), dtype=np.float32)
        if env.is_main:
            summary, error, recs, pred = _merge_and_choose(
                parts, labels, space, head=c.head, w_q=w_q, w_l=w_l, budget=budget, world_size=env.world_size
            )
            if summary is not None:
                summary["routers"] = [str(d) for d in opened.dirs]
        summary, error = broadcast_object((summary, error), env)
        if error is not None:
            raise ValueError(error)
        return RouteResult(recs, summary, pred, is_main=env.is_main)


def _routed_clips(
    labels: Labels | None, refs: Sequence[VideoRef], router: OpenModel, clips: str | int, env: DistEnv
) -> tuple[_Ordered, Any, list[tuple[tuple[int, int], str, str]]]:
    """This rank's clips (the labels' clips with ``--eval``), their collate and the clips skipped up front.

    Every clip and failure carries an order key (group, position): group = the video's number in
    ``refs`` (or the source's number in the labels), position = its place within this rank's share.
    Sorting the gathered keys restores the order of a one-process run.
    """
    c, rank, world = router.model.config, env.rank, env.world_size
    failures: list[tuple[tuple[int, int], str, str]] = []
    if labels is not None:
        spec = labels.clip_spec()
        group = {s: g for g, s in enumerate(dict.fromkeys(labels.sources))}
        items, skipped = label_clips(labels, refs, spec, rank=rank, world_size=world)
        failures += [((group[s], -1), s, r) for s, r in skipped]
        order = [(group[labels.sources[row]], i) for i, (row, _, _) in enumerate(items)]
        dataset: Any = LabelClipDataset(items, spec)
        collate: Any = collate_label_clips
    else:
        fps = router.meta.get("clip", {}).get("fps", "native")
        spec = ClipSpec(frames=c.frames, height=c.height, width=c.width, fps=fps)
        dataset = ClipIndexDataset(refs[rank::world], spec, parse_clip_policy(clips))
        order = [(v * world + rank, i) for i, (v, _, _) in enumerate(dataset.index)]
        collate = collate_clips
    if (spec.frames, spec.height, spec.width) != (c.frames, c.height, c.width):
        raise ValueError(
            f"clips are {spec.frames}x{spec.height}x{spec.width} but the router takes {c.frames}x{c.height}x{c.width}"
        )
    return _Ordered(dataset, order), collate, failures


def _merge_and_choose(
    parts: list[dict[str, Any]],
    labels: Labels | None,
    space: AssignmentSpace,
    *,
    head: str,
    w_q: float,
    w_l: float,
    budget: float | None,
    world_size: int,
) -> tuple[dict[str, Any] | None, str | None, list[dict[str, Any]], np.ndarray]:
    """Rank 0: every rank's clips in one-process order, then :func:`_choose` -> (summary, error, records, pred)."""
    keys = [k for p in parts for k in p["keys"]]
    perm = sorted(range(len(keys)), key=keys.__getitem__)
    recs = [r for p in parts for r in p["recs"]]
    recs = [recs[i] for i in perm]
    pred = np.concatenate([p["pred"] for p in parts])[perm]
    rows = [r for p in parts for r in p["rows"]]
    rows = [rows[i] for i in perm] if labels is not None else []
    failed = sorted((f for p in parts for f in p["failures"]), key=lambda f: f[0])  # stable: per-rank order kept
    failures = [{"source": s, "reason": r} for _, s, r in failed]
    if not recs:
        first = f" (first failure: {failures[0]['source']}: {failures[0]['reason']})" if failures else ""
        return None, "no clip could be read" + first, recs, pred
    summary = _choose(
        recs,
        pred,
        rows,
        labels,
        space,
        head=head,
        w_q=w_q,
        w_l=w_l,
        budget=budget,
        failures=failures,
        world_size=world_size,
    )
    return summary, None, recs, pred


def _choose(
    recs: list[dict[str, Any]],
    pred: np.ndarray,
    rows: list[int],
    labels: Labels | None,
    space: AssignmentSpace,
    *,
    head: str,
    w_q: float,
    w_l: float,
    budget: float | None,
    failures: list[dict[str, str]],
    world_size: int,
) -> dict[str, Any]:
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
        "clips": len(recs),
        "mean_tokens": float(lengths[idx].mean()),
        "head": head,
        "w_q": w_q,
        "w_l": w_l,
        "budget": budget,
        "lambda": lam,
        "failures": failures,
        "world_size": world_size,
    }
    if labels is not None:
        for r, row in zip(recs, rows):
            r["key"] = labels.keys[row]
        summary["eval"] = evaluate(idx, labels, w_q, w_l, rows=rows, scores=routing_scores(pred, head, space, w_q, w_l))
    return summary
