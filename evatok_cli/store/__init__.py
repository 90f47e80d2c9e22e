"""Token stores: ragged token sequences of clips, on Zarr v3 (default) or WebDataset tar shards.

Format v1 is specified in DESIGN §4 and docs/formats.md. One writer per rank, resumable after a
kill, a single index once every rank is done; readers never need the world size::

    from evatok_cli.store import Sample, open_writer, open_store

    with open_writer("out.zarr", attrs=attrs, num_blocks=4) as w:
        todo = [c for c in clips if c.key not in w.done_keys]   # resume: skip committed keys
        for batch in batches(todo):                             # same order as the first run
            w.append([Sample(...) for ... in batch])
    store = open_store("out.zarr")
    store[0].tokens, store.block_tokens(0), store.stats()

The torch datasets live in :mod:`evatok_cli.store.dataset` (imported lazily: this package does
not import torch).
"""

from __future__ import annotations

from evatok_cli.store.api import detect_format, finalize, is_store, open_store, open_writer
from evatok_cli.store.common import (
    FORMAT_VERSION,
    Sample,
    StoreError,
    StoreReader,
    StoreWriter,
    token_dtype,
)

__all__ = [
    "FORMAT_VERSION",
    "Sample",
    "StoreError",
    "StoreReader",
    "StoreWriter",
    "TokenDataset",
    "TokenIterableDataset",
    "collate_ragged",
    "detect_format",
    "finalize",
    "is_store",
    "open_store",
    "open_writer",
    "token_dtype",
]


def __getattr__(name: str):
    if name in ("TokenDataset", "TokenIterableDataset", "collate_ragged"):
        from evatok_cli.store import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'evatok_cli.store' has no attribute {name!r}")
