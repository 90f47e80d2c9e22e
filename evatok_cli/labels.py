"""Labels stores: the schema, the writer's attributes and the reader (EVATok stage 2 -> stage 3).

A **labels store** (written by ``evatok search``) is a token store v1 whose attrs add
``kind: "labels"`` and ``search: {metric, higher_is_better, w_q, w_l, calibration: {mean, std, ...}}``,
with per-clip extra fields ``metric`` (m^T,) (NaN where unexplored) and ``reward``; its
``assignment`` column is the best assignment (docs/formats.md, docs/pipeline.md "Search").

- :func:`labels_attrs`: the attrs the search writes;
- :func:`load_labels` -> :class:`Labels`: everything routing targets and evaluation need, in memory;
  several stores of one search setup (e.g. a later batch of clips) are read as one;
- :func:`label_clips`, :class:`LabelClipDataset`: the labelled clips, found again among videos
  (router training and ``evatok route --eval``).

Rewards come from :mod:`evatok_cli.reward` (one formula for search, training and routing).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.checkpoint import OpenModel, store_attrs
from evatok_cli.metrics import Metric
from evatok_cli.reward import CalibrationStats, nanargmax_rows, reward_weights, rewards
from evatok_cli.store import open_store
from evatok_cli.video import ClipReader, ClipSpec, VideoError, VideoRef, probe, resampled_length, source_name

log = logging.getLogger(__name__)


def labels_attrs(
    proxy: OpenModel,
    spec: ClipSpec,
    metric: Metric,
    *,
    w_q: float,
    w_l: float,
    calibration: CalibrationStats,
    beam: int | None,
) -> dict[str, Any]:
    """Store attrs of a labels store: the proxy's standard attrs (:func:`~evatok_cli.checkpoint.store_attrs`) +
    ``kind`` + ``search``."""
    search: dict[str, Any] = {
        "metric": metric.name,
        "higher_is_better": bool(metric.higher_is_better),
        "w_q": float(w_q),
        "w_l": float(w_l),
        "calibration": calibration.attrs(),
        "beam": None if beam is None else int(beam),
    }
    if getattr(metric, "net", None):
        search["metric_net"] = metric.net  # LPIPS backbone (vgg / alex)
    return store_attrs(proxy, spec, {"kind": "labels", "search": search})


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
        w_q, w_l = self.weights(w_q, w_l)
        return rewards(self.metric, {"mean": self.mean, "std": self.std}, self.space, w_q, w_l, self.higher_is_better)

    def best_assignments(self, w_q: float | None = None, w_l: float | None = None) -> np.ndarray:
        """(N,) best index: the stored one at the store's weights, else the argmax recomputed from the metric."""
        w_q, w_l = self.weights(w_q, w_l)
        if (w_q, w_l) == (self.w_q, self.w_l):
            return self.best.copy()
        return nanargmax_rows(self.rewards(w_q, w_l))

    def clip_spec(self) -> ClipSpec:
        c = self.clip
        return ClipSpec(
            frames=int(c["frames"]), height=int(c["height"]), width=int(c["width"]), fps=c.get("fps", "native")
        )


def load_labels(path: str | Path) -> Labels:
    """Read a labels store (the output of ``evatok search``) into memory.

    Raises:
        ValueError: not a labels store (no ``search`` attrs or no ``metric`` field).
        StoreError: not a finished store.
    """
    store = open_store(path)
    attrs = store.attrs
    search = attrs.get("search")
    if attrs.get("kind") != "labels" or not isinstance(search, dict) or "metric" not in store.extra_fields:
        raise ValueError(
            f"{path}: not a labels store (expected kind 'labels', 'search' attrs and a 'metric' field; "
            "make one with `evatok search`)"
        )
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
    w_q, w_l = reward_weights(recorded=search)
    return Labels(
        space=space,
        keys=list(store.keys),
        sources=sources,
        clip_starts=starts,
        best=store.assignments().astype(np.int64),
        metric=metric,
        metric_name=str(search.get("metric", "metric")),
        higher_is_better=bool(search.get("higher_is_better", False)),
        mean=float(cal.get("mean", 0.0)),
        std=float(cal.get("std", 1.0)),
        w_q=w_q,
        w_l=w_l,
        clip=dict(attrs.get("clip") or {}),
        path=str(path),
        attrs=attrs,
    )


def _same_search(first: Labels, other: Labels) -> str | None:
    """Why ``other`` cannot be concatenated to ``first`` (None when it can)."""
    tok_a, tok_b = (lab.attrs.get("tokenizer") or {} for lab in (first, other))
    checks = (
        ("assignment space", first.space.levels, other.space.levels),
        ("blocks", first.space.blocks, other.space.blocks),
        ("metric", first.metric_name, other.metric_name),
        ("proxy tokenizer (sha256)", tok_a.get("sha256"), tok_b.get("sha256")),
        ("calibration mean/std", (first.mean, first.std), (other.mean, other.std)),
        ("reward weights w_q/w_l", (first.w_q, first.w_l), (other.w_q, other.w_l)),
        ("clip geometry", first.clip_spec(), other.clip_spec()),
    )
    for what, a, b in checks:
        if a != b:
            hint = " (search it with --stats FIRST_STORE)" if what.startswith("calibration") else ""
            return f"{what} {b} differs from {first.path}'s {a}{hint}"
    return None


def concat_labels(parts: Sequence[Labels]) -> Labels:
    """One :class:`Labels` from stores of the same search setup (same proxy, space, metric, calibration,
    weights and clip geometry), rows in the order given; the first store's attrs.

    Raises:
        ValueError: no store, a store of another setup (naming it and the field), or a clip (key)
            labelled in two stores.
    """
    if not parts:
        raise ValueError("no labels store given")
    first = parts[0]
    if len(parts) == 1:
        return first
    seen: dict[str, str] = {}
    for lab in parts:
        why = _same_search(first, lab)
        if why is not None:
            raise ValueError(f"{lab.path}: cannot be read with {first.path}: {why}")
        for k in lab.keys:
            if k in seen:
                raise ValueError(f"{lab.path}: clip {k} is also labelled in {seen[k]}")
            seen[k] = lab.path
    return Labels(
        space=first.space,
        keys=[k for lab in parts for k in lab.keys],
        sources=[s for lab in parts for s in lab.sources],
        clip_starts=np.concatenate([lab.clip_starts for lab in parts]),
        best=np.concatenate([lab.best for lab in parts]),
        metric=np.concatenate([lab.metric for lab in parts]),
        metric_name=first.metric_name,
        higher_is_better=first.higher_is_better,
        mean=first.mean,
        std=first.std,
        w_q=first.w_q,
        w_l=first.w_l,
        clip=dict(first.clip),
        path=",".join(lab.path for lab in parts),
        attrs=first.attrs,
    )


def _canonical(source: str) -> str:
    path, sep, member = source.partition("::")
    return os.path.realpath(path) + sep + member


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
        names.setdefault(source_name(r.source), []).append(r)
    out: dict[str, VideoRef] = {}
    for s in dict.fromkeys(sources):
        ref = exact.get(s) or canon.get(_canonical(s))
        if ref is None and len(names.get(source_name(s), [])) == 1:
            ref = names[source_name(s)][0]
        if ref is not None:
            out[s] = ref
    return out


def label_clips(
    labels: Labels, refs: Sequence[VideoRef], spec: ClipSpec, *, rank: int = 0, world_size: int = 1
) -> tuple[list[tuple[int, VideoRef, int]], list[tuple[str, str]]]:
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

        return {
            "video": torch.from_numpy(np.ascontiguousarray(frames)),
            "row": row,
            "source": ref.source,
            "clip_start": start,
        }


def collate_label_clips(items: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(batch with ``video`` uint8 (B, F, H, W, 3), ``row`` int64 (B,), ``source``, ``clip_start``; failures)."""
    good = [it for it in items if "error" not in it]
    bad = [it for it in items if "error" in it]
    batch = {
        "video": torch.stack([it["video"] for it in good]) if good else torch.empty((0, 0, 0, 0, 3), dtype=torch.uint8),
        "row": torch.tensor([it["row"] for it in good], dtype=torch.int64),
        "source": [it["source"] for it in good],
        "clip_start": [int(it["clip_start"]) for it in good],
    }
    return batch, bad


__all__ = [
    "LabelClipDataset",
    "Labels",
    "collate_label_clips",
    "concat_labels",
    "label_clips",
    "labels_attrs",
    "load_labels",
    "resolve_sources",
]
