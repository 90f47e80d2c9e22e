"""torch datasets over videos: a clip index for encoding, search and routing.

- :class:`ClipIndexDataset` (map-style): probes every video up front, so ``len`` is the number of
  clips and item ``i`` is always the same clip. A video that fails (at probe or at decode time)
  yields an item with an ``"error"`` reason instead of raising, so one bad file never kills a
  DataLoader; :func:`collate_clips` separates the good clips from the failures. Each worker keeps
  the last video open, so consecutive clips of one video decode it once; with several workers,
  pass ``sampler=ds.worker_order(batch_size, num_workers)`` so that each worker reads consecutive
  clips (see :meth:`ClipIndexDataset.worker_order`).

Items are dicts: ``video`` uint8 tensor (F, H, W, 3), ``key`` (:func:`clip_key`), ``source``,
``clip_start``, ``label_hint``. :func:`to_model_input` / :func:`to_uint8` convert batches between
that edge layout and the models' float (B, 3, F, H, W) in [-1, 1] (DESIGN §3).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from evatok_cli.video.clips import ClipPolicy, ClipReader, ClipSpec, plan_starts
from evatok_cli.video.errors import VideoError
from evatok_cli.video.probe import VideoSource, probe, source_name
from evatok_cli.video.sources import VideoRef, clip_key

log = logging.getLogger(__name__)


def _decoder_threads(threads: int | None) -> int:
    """FFmpeg threads: one per DataLoader worker (the workers are the parallelism), else automatic."""
    if threads is not None:
        return threads
    return 1 if get_worker_info() is not None else 0


def _label_hint(ref: VideoSource) -> str:
    return ref.label_hint if isinstance(ref, VideoRef) else ""


def _item(
    ref: VideoSource, source: str, start: int, frames: np.ndarray, clip_start: int | None = None
) -> dict[str, Any]:
    # The key comes from the planned start, so resumes find it; ``clip_start`` is where the clip
    # really starts (earlier when the container states more frames than decode: clips.ClipReader.read).
    return {
        "video": torch.from_numpy(frames),
        "key": clip_key(source, start),
        "source": source,
        "clip_start": start if clip_start is None else clip_start,
        "label_hint": _label_hint(ref),
    }


def worker_contiguous_order(n: int, batch_size: int, num_workers: int) -> list[int]:
    """Order of ``range(n)`` under which DataLoader worker w reads one contiguous share of items.

    The DataLoader cuts the sampler order into batches and hands batch k to worker
    ``k % num_workers``. The batches of ``range(n)`` are split into ``num_workers`` contiguous
    shares (sizes differ by at most one, larger shares to the first workers, who are served first
    in each round) and interleaved in dispatch order; the share holding the short final batch goes
    to the worker served last, so that every batch but the last stays full.

    Args:
        n: number of items.
        batch_size: the DataLoader's batch size.
        num_workers: the DataLoader's worker count (0 or 1: ``range(n)``).

    Returns:
        A permutation of ``range(n)``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers <= 1 or n <= batch_size:
        return list(range(n))
    n_batches = -(-n // batch_size)
    base, extra = divmod(n_batches, num_workers)
    size = [base + (w < extra) for w in range(num_workers)]
    last = extra - 1 if extra else num_workers - 1  # the worker that receives the final batch
    # Shares in index order go to workers last+1, last+2, ..., last (mod num_workers).
    first: dict[int, int] = {}
    b = 0
    for j in range(num_workers):
        w = (j + last + 1) % num_workers
        first[w] = b
        b += size[w]
    order: list[int] = []
    for k in range(size[0]):
        for w in range(num_workers):
            if k < size[w]:
                b = first[w] + k
                order.extend(range(b * batch_size, min((b + 1) * batch_size, n)))
    return order


class ClipIndexDataset(Dataset):
    """Map-style dataset of every clip chosen by ``policy`` in every video.

    Args:
        refs: the videos (VideoRefs, paths or bytes).
        spec: clip geometry and frame rate.
        policy: clip policy (``"all"``, ``"first"``, ``"random"``, int N).
        seed: seed of the ``"random"`` policy (same starts as :func:`read_clips` with this seed).
        threads: FFmpeg decoder threads; default 1 inside DataLoader workers, automatic otherwise.

    Attributes:
        index: ``(video number, clip start, error or None)`` per item; a video that fails to probe
            (or is too short) has one item carrying its error.
        failures: the probe failures, as VideoErrors.
    """

    def __init__(
        self,
        refs: Sequence[VideoSource],
        spec: ClipSpec,
        policy: ClipPolicy = "all",
        seed: int = 0,
        *,
        threads: int | None = None,
    ) -> None:
        self.refs = list(refs)
        self.spec = spec
        self.policy = policy
        self.seed = seed
        self.threads = threads
        self.index: list[tuple[int, int, str | None]] = []
        self.failures: list[VideoError] = []
        for i, ref in enumerate(self.refs):
            try:
                starts = plan_starts(probe(ref), spec, policy, seed)
            except VideoError as e:
                # A fresh error without traceback: the original's frames would keep PyAV objects alive.
                self.failures.append(VideoError(e.path, e.reason))
                self.index.append((i, -1, e.reason))
                continue
            self.index.extend((i, s, None) for s in starts)
        if self.failures:
            log.warning(
                "%d of %d videos cannot be read; first: %s", len(self.failures), len(self.refs), self.failures[0]
            )
        self._reader: tuple[int, int, ClipReader] | None = None  # (pid, video number, open reader)

    def __len__(self) -> int:
        return len(self.index)

    def worker_order(self, batch_size: int, num_workers: int) -> list[int]:
        """A sampler order giving each DataLoader worker one contiguous stretch of the index.

        A DataLoader hands batch k to worker ``k % num_workers``; in index order, the clips of one
        video are then spread over all workers and each of them decodes the video's beginning
        again. Passed as ``sampler=``, this order gives worker w the w-th contiguous share of the
        batches instead, so every video is decoded about once. Items arrive in a different order
        than the index (identify them by ``key``).

        Args:
            batch_size: the DataLoader's batch size.
            num_workers: the DataLoader's worker count (0 or 1: index order).

        Returns:
            A permutation of ``range(len(self))``.
        """
        return worker_contiguous_order(len(self), batch_size, num_workers)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_reader"] = None  # open decoders do not travel to worker processes
        return state

    def _open(self, i: int) -> ClipReader:
        pid = os.getpid()
        if self._reader is not None:
            rpid, ri, reader = self._reader
            if rpid == pid and ri == i:
                return reader
            if rpid == pid:
                reader.close()
            self._reader = None  # a reader inherited through fork was already orphaned (clips.py)
        reader = ClipReader(self.refs[i], self.spec, threads=_decoder_threads(self.threads))
        self._reader = (pid, i, reader)
        return reader

    def __getitem__(self, idx: int) -> dict[str, Any]:
        i, start, error = self.index[idx]
        ref = self.refs[i]
        source = source_name(ref)
        if error is None:
            try:
                clip = self._open(i).read(start)
                return _item(ref, source, start, clip.frames, clip.start)
            except VideoError as e:
                self._reader = None
                error = e.reason
        return {"key": clip_key(source, max(start, 0)), "source": source, "clip_start": start, "error": error}


def collate_clips(items: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Collate dataset items, keeping failures apart (use as a DataLoader ``collate_fn``).

    Args:
        items: dicts from :class:`ClipIndexDataset`.

    Returns:
        ``(batch, failures)``: ``batch`` has ``video`` uint8 (B, F, H, W, 3) (B may be 0, then the
        tensor is empty), ``clip_start`` int64 (B,), and lists ``key``, ``source``, ``label_hint``
        (plus ``epoch`` when present); ``failures`` are the items carrying an ``"error"``.
    """
    good = [it for it in items if "error" not in it]
    failures = [dict(it) for it in items if "error" in it]
    batch: dict[str, Any] = {
        "video": torch.stack([it["video"] for it in good]) if good else torch.empty((0, 0, 0, 0, 3), dtype=torch.uint8),
        "key": [it["key"] for it in good],
        "source": [it["source"] for it in good],
        "clip_start": torch.tensor([it["clip_start"] for it in good], dtype=torch.int64),
        "label_hint": [it.get("label_hint", "") for it in good],
    }
    if good and "epoch" in good[0]:
        batch["epoch"] = torch.tensor([it["epoch"] for it in good], dtype=torch.int64)
    return batch, failures


def to_model_input(video: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1] (DESIGN §3).

    Args:
        video: uint8 clips, channels last.
        dtype: floating dtype of the result.

    Returns:
        ``video / 127.5 - 1`` as (B, 3, F, H, W), contiguous.
    """
    if video.ndim != 5 or video.shape[-1] != 3 or video.dtype != torch.uint8:
        raise ValueError(f"expected uint8 (B, F, H, W, 3), got {video.dtype} {tuple(video.shape)}")
    x = video.permute(0, 4, 1, 2, 3).to(dtype)  # (B, 3, F, H, W)
    return (x / 127.5 - 1.0).contiguous()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float (B, 3, F, H, W) in [-1, 1] -> uint8 (B, F, H, W, 3); values are clamped and rounded.

    Args:
        x: model-space clips.

    Returns:
        The inverse of :func:`to_model_input` (exact on its outputs).
    """
    if x.ndim != 5 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"expected float (B, 3, F, H, W), got {x.dtype} {tuple(x.shape)}")
    y = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 4, 1).contiguous()  # (B, F, H, W, 3)
