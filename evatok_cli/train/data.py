"""Training clips as a function of the step: random clips, reproducible, resumable, rank-sharded.

Item ``i`` of the stream (global index ``step * global_batch + rank * local_batch + j``) is decoded
from a video and a clip start drawn from ``numpy.random.default_rng([seed, i])``. A run resumed at
step ``s`` therefore sees exactly the clips an uninterrupted run sees from step ``s`` on, whatever
the number of DataLoader workers, and ranks never see the same item. A video that fails to decode
is skipped (logged once) and the item is drawn again from the next candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from evatok_cli.video import ClipSpec, VideoError, VideoRef, read_clips

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 32


class RandomClipStream(Dataset):
    """Map-style: index -> one random clip, uint8 tensor (F, H, W, 3), deterministic in (seed, index)."""

    def __init__(self, refs: Sequence[VideoRef], spec: ClipSpec, seed: int = 0) -> None:
        if not refs:
            raise ValueError("no training videos")
        self.refs = list(refs)
        self.spec = spec
        self.seed = seed
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return 2**62  # unbounded stream; the sampler decides which indices are read

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        for _ in range(MAX_ATTEMPTS):
            v = int(rng.integers(len(self.refs)))
            clip_seed = int(rng.integers(2**31))
            if v in self._bad:
                continue
            try:
                clip = read_clips(self.refs[v], self.spec, policy="random", seed=clip_seed)[0]
            except VideoError as e:
                self._bad.add(v)
                log.warning("skipping training video: %s", e)
                continue
            return {
                "video": torch.from_numpy(np.ascontiguousarray(clip.frames)),
                "source": clip.source,
                "clip_start": clip.start,
            }
        raise VideoError(str(self.refs[0].source), f"no decodable training clip after {MAX_ATTEMPTS} attempts")


class StepSampler(Sampler[int]):
    """Indices of this rank's items, step after step from ``start_step`` (infinite)."""

    def __init__(self, start_step: int, local_batch: int, rank: int, world_size: int) -> None:
        self.start_step, self.local_batch, self.rank, self.world = start_step, local_batch, rank, world_size

    def __iter__(self) -> Iterator[int]:
        step = self.start_step
        global_batch = self.local_batch * self.world
        while True:
            base = step * global_batch + self.rank * self.local_batch
            yield from range(base, base + self.local_batch)
            step += 1

    def __len__(self) -> int:  # pragma: no cover - infinite
        return 2**62


def _collate(items: list[dict]) -> dict:
    return {
        "video": torch.stack([it["video"] for it in items]),
        "source": [it["source"] for it in items],
        "clip_start": [it["clip_start"] for it in items],
    }


def clip_batches(
    refs: Sequence[VideoRef],
    spec: ClipSpec,
    *,
    seed: int,
    local_batch: int,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
):
    """``batches(start_step)`` for :func:`evatok_cli.train.loop.run`: one dict per step with
    ``video`` uint8 (B, F, H, W, 3), ``source`` and ``clip_start`` lists."""
    dataset = RandomClipStream(refs, spec, seed)

    def batches(start_step: int) -> Iterator[dict]:
        loader = DataLoader(
            dataset,
            batch_size=local_batch,
            sampler=StepSampler(start_step, local_batch, rank, world_size),
            num_workers=workers,
            collate_fn=_collate,
            persistent_workers=False,
            prefetch_factor=4 if workers > 0 else None,
        )
        return iter(loader)

    return batches
