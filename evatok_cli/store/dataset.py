"""torch datasets over token stores: map-style, streaming, and a collate for ragged sequences.

Items are dicts: ``tokens`` (L,) int64, ``block_lengths`` (T,) int64, ``assignment`` int,
``label`` int, ``key`` str, and ``extra`` {name: tensor} when the store declares extra fields.
Batch them with :func:`collate_ragged` (pads ``tokens`` and returns ``lengths``)::

    loader = DataLoader(TokenDataset("ucf.zarr"), batch_size=32, shuffle=True,
                        num_workers=2, collate_fn=functools.partial(collate_ragged, pad_id=PAD))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from evatok_cli.store.api import open_store
from evatok_cli.store.common import Sample, StoreReader


def sample_to_item(s: Sample) -> dict[str, Any]:
    """A store Sample as the dict of tensors the datasets yield."""
    item: dict[str, Any] = {
        "tokens": torch.from_numpy(np.asarray(s.tokens).astype(np.int64)),
        "block_lengths": torch.from_numpy(np.asarray(s.block_lengths).astype(np.int64)),
        "assignment": int(s.assignment),
        "label": int(s.label),
        "key": s.key,
    }
    if s.extra:
        item["extra"] = {k: torch.as_tensor(np.asarray(v)) for k, v in s.extra.items()}
    return item


class TokenDataset(Dataset):
    """Map-style dataset over one store (random access; zarr stores are the fast choice).

    Args:
        store: an open :class:`StoreReader` or a store path.
    """

    def __init__(self, store: StoreReader | str | Path) -> None:
        self.reader = store if isinstance(store, StoreReader) else open_store(store)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return sample_to_item(self.reader[i])


class TokenIterableDataset(IterableDataset):
    """Streams one or more stores, split by distributed rank and by DataLoader worker.

    The stores are cut into units that read in one go (zarr: 256-sample windows; wds: shards).
    Units go round-robin to ranks, then to the workers of each rank, so every sample is seen
    exactly once per epoch across all ranks and workers (ranks may differ by up to one unit).
    With ``shuffle`` the unit order and the order inside each unit are permuted from
    ``(seed, epoch)``; call :meth:`set_epoch` each epoch.

    Args:
        paths: a store path or a list of them (or open readers).
        shuffle: permute units and samples within units.
        seed: base seed of the permutation.
        rank, world_size: this process's share; default: from torch.distributed if initialised,
            else 0 and 1.
    """

    def __init__(
        self,
        paths: str | Path | StoreReader | Sequence[str | Path | StoreReader],
        *,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(paths, (str, Path, StoreReader)):
            paths = [paths]
        self._sources = [p if isinstance(p, StoreReader) else Path(p) for p in paths]
        if rank is None or world_size is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if on else 0 if rank is None else rank
            world_size = dist.get_world_size() if on else 1 if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed, self.epoch = bool(shuffle), int(seed), 0
        self._readers: list[StoreReader] = []
        self._units = [(s, a, b) for s, r in enumerate(self._open()) for a, b in r.units()]

    def _open(self) -> list[StoreReader]:
        # Forked workers inherit the readers; pickled ones (spawn) reopen them from the paths.
        if not self._readers:
            self._readers = [s if isinstance(s, StoreReader) else open_store(s) for s in self._sources]
        return self._readers

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_readers": []}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _rank_units(self) -> list[tuple[int, int, int]]:
        order = np.arange(len(self._units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self._units))
        return [self._units[i] for i in order[self.rank :: self.world_size]]

    def __len__(self) -> int:
        """Samples this rank sees per epoch (summed over its workers)."""
        return sum(b - a for _, a, b in self._rank_units())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        readers = self._open()
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        for s, a, b in self._rank_units()[wid::nw]:
            rows: Any = readers[s].iter_range(a, b)
            if self.shuffle:
                rows = list(rows)
                perm = np.random.default_rng([self.seed, self.epoch, s, a]).permutation(len(rows))
                rows = [rows[i] for i in perm]
            for row in rows:
                yield sample_to_item(row)


def collate_ragged(batch: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Batch dataset items of different lengths.

    Returns:
        ``tokens`` (B, L_max) int64 padded with ``pad_id``, ``lengths`` (B,), ``block_lengths``
        (B, T), ``assignment`` (B,), ``label`` (B,), ``key`` list[str], and ``extra`` {name:
        (B, ...)} when present.
    """
    lengths = torch.tensor([len(x["tokens"]) for x in batch], dtype=torch.int64)
    tokens = torch.full((len(batch), int(lengths.max()) if len(batch) else 0), int(pad_id), dtype=torch.int64)
    for i, x in enumerate(batch):
        tokens[i, : len(x["tokens"])] = x["tokens"]
    out: dict[str, Any] = {
        "tokens": tokens,
        "lengths": lengths,
        "block_lengths": torch.stack([x["block_lengths"] for x in batch]),
        "assignment": torch.tensor([x["assignment"] for x in batch], dtype=torch.int64),
        "label": torch.tensor([x["label"] for x in batch], dtype=torch.int64),
        "key": [x["key"] for x in batch],
    }
    if batch and "extra" in batch[0]:
        out["extra"] = {k: torch.stack([x["extra"][k] for x in batch]) for k in batch[0]["extra"]}
    return out
