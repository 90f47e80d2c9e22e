"""Calibration of the clip metric: its mean and std over random (clip, assignment) pairs (PAPER §3.2, Eq. 6).

Also how a search reuses a calibration: a ``--stats`` file, or the labels store of an earlier run of
the same search (resume).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from evatok_cli.metrics import Metric
from evatok_cli.models.tokenizer import EVATokTokenizer
from evatok_cli.reward import CalibrationStats
from evatok_cli.runtime import DistEnv, all_gather_objects
from evatok_cli.search.tree import reconstruct, resolve_metric
from evatok_cli.store import StoreError, detect_format, open_store
from evatok_cli.video import VideoError, read_clips
from evatok_cli.video.dataset import to_model_input

log = logging.getLogger(__name__)

CALIBRATION_STREAM = 0xCA1  # mixed into the seed of the calibration draws


class _CalibrationClips(Dataset):
    """Pair i -> a random clip of video ``videos[i]`` (seeded by (seed, i)), or its error."""

    def __init__(self, refs: Sequence[Any], spec: Any, videos: np.ndarray, seed: int, pairs: Sequence[int]) -> None:
        self.refs, self.spec, self.videos, self.seed, self.pairs = list(refs), spec, videos, seed, list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> dict[str, Any]:
        i = self.pairs[j]
        rng = np.random.default_rng([self.seed, CALIBRATION_STREAM, 1, i])
        try:
            clip = read_clips(self.refs[int(self.videos[i])], self.spec, policy="random", seed=rng)[0]
        except VideoError as e:
            return {"pair": i, "error": str(e)}
        return {"pair": i, "video": torch.from_numpy(np.ascontiguousarray(clip.frames))}


def calibrate(
    model: EVATokTokenizer,
    refs: Sequence[Any],
    spec: Any,
    metric: Metric | str,
    *,
    count: int = 2000,
    seed: int = 0,
    batch_size: int = 8,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    proxy_sha256: str | None = None,
) -> CalibrationStats:
    """Mean/std of the clip metric over ``count`` random (clip, assignment) pairs.

    Pair i draws a video and an assignment uniformly with ``default_rng([seed, CALIBRATION_STREAM])``
    and a random clip of that video with ``default_rng([seed, CALIBRATION_STREAM, 1, i])``. Under
    torchrun every rank computes pairs i = rank, rank + world, ... and all values are gathered in
    pair order, so every rank ends with the same statistics (call it on all ranks). Pairs whose
    video cannot be read are left out (``count`` is the number used).
    """
    if count < 2:
        raise ValueError(f"calibration needs at least 2 pairs, got {count}")
    if not refs:
        raise ValueError("calibration needs at least one video")
    metric = resolve_metric(metric)
    space, pt, dev = model.config.space, model.config.temporal_patch, next(model.parameters()).device
    rng = np.random.default_rng([seed, CALIBRATION_STREAM])
    videos = rng.integers(len(refs), size=count)
    assign = torch.as_tensor(space.table()[rng.integers(len(space), size=count)])
    ds = _CalibrationClips(refs, spec, videos, seed, range(rank, count, world_size))
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=list)
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
        env = DistEnv(rank=rank, world_size=world_size)
        mine = [p for part in all_gather_objects(mine, env) for p in part]
    values = np.array([v for _, v in sorted(mine)], dtype=np.float64)
    if len(values) < 2:
        raise ValueError(f"calibration: only {len(values)} of {count} pairs could be read")
    name = getattr(metric, "name", "")
    return CalibrationStats(float(values.mean()), float(values.std()), int(len(values)), int(seed), name, proxy_sha256)


def stored_attrs(path: Path) -> dict[str, Any] | None:
    try:
        if detect_format(path) is None:
            return None
        return open_store(path, allow_unfinished=True).attrs
    except (StoreError, OSError, ValueError, KeyError):
        return None


def reusable_calibration(
    attrs: dict[str, Any] | None, metric: str, sha256: str, seed: int, count: int
) -> CalibrationStats | None:
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


def check_stats(stats: CalibrationStats, metric: str, sha256: str) -> None:
    if stats.metric and stats.metric != metric:
        raise ValueError(f"--stats were computed for metric {stats.metric!r}, this search uses {metric!r}")
    if stats.proxy_sha256 and stats.proxy_sha256 != sha256:
        raise ValueError("--stats were computed with another proxy tokenizer (weights sha256 differs)")
