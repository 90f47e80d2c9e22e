"""Opening, finalizing and detecting token stores, whatever their format (DESIGN §4)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from evatok_cli.store.common import (
    FORMAT_VERSION,
    Layout,
    StoreError,
    StoreReader,
    StoreWriter,
    normalize_attrs,
    normalize_extra_fields,
    token_dtype,
)
from evatok_cli.store.lock import acquire
from evatok_cli.store.wds_format import INDEX_JSON, WdsReader, WdsWriter, finalize_wds, is_wds_store
from evatok_cli.store.zarr_format import ZarrReader, ZarrWriter, finalize_zarr, read_root_meta

Format = Literal["zarr", "wds"]


def detect_format(path: str | Path) -> Format | None:
    """ "zarr" or "wds" when ``path`` holds a (possibly unfinished) evatok store, else None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if read_root_meta(path) is not None:
        return "zarr"
    if is_wds_store(path):
        return "wds"
    return None


def is_store(path: str | Path) -> bool:
    """True for a finished store: a zarr group with its index, or a wds dir with index.json."""
    path = Path(path)
    try:
        fmt = detect_format(path)
        if fmt == "zarr":
            meta = read_root_meta(path)
            return meta is not None and "index" in meta
    except StoreError:
        return False
    return fmt == "wds" and (path / INDEX_JSON).is_file()


def open_writer(
    path: str | Path,
    *,
    format: Format = "zarr",
    attrs: dict[str, Any],
    num_blocks: int,
    rank: int = 0,
    world_size: int = 1,
    extra_fields: dict[str, tuple[Any, tuple[int, ...]]] | None = None,
    samples_per_shard: int = 1000,
    commit_every: int = 256,
    commit_seconds: float | None = 60.0,
    barrier: Callable[[], Any] | None = None,
) -> StoreWriter:
    """Open (create or resume) rank ``rank``'s writer of the store at ``path``.

    A rerun of the same command resumes: ``writer.done_keys`` holds the keys this rank committed
    before; the caller skips them and must feed the remaining samples in the same deterministic
    order as the first run. A finished store gives ``writer.finished == True`` (nothing to do).

    Args:
        path: the store (a ``.zarr`` directory, or a directory of tar shards for wds).
        format: "zarr" (default) or "wds"; an existing store must have the same format.
        attrs: JSON-able store metadata; needs ``space`` {levels, blocks} and ``codebook_size``,
            should carry ``tokenizer`` {config, sha256} and ``clip`` {frames, height, width, fps}.
            Must equal the attrs of an existing store (never mix tokenizers in one store).
        num_blocks: T, the number of temporal blocks (must match ``attrs["space"]``).
        rank, world_size: this process and the number of writers (torchrun); one part per rank.
        extra_fields: per-sample fixed-shape fields, ``{name: (dtype, shape)}``, e.g.
            ``{"metric": ("float32", (625,)), "reward": ("float32", ())}``.
        samples_per_shard: wds shard size (the unit of commit for wds).
        commit_every: zarr commits after this many buffered samples (and on flush()/close()).
        commit_seconds: also commit when an append() finds the oldest uncommitted sample older
            than this (zarr: commits the buffer; wds: closes the shard early), so a kill loses at
            most about this much work even when samples are slow to produce. None: off.
        barrier: a collective barrier (e.g. ``torch.distributed.barrier``); with it, close() waits
            for all ranks and rank 0 writes the index.

    Returns:
        A :class:`StoreWriter` (use it as a context manager or call ``close()``).

    Raises:
        StoreLockedError: another process or job is writing the store (nothing was changed).
        StoreError: the path holds something else, or a store with other attrs/format/world size.
    """
    path = Path(path)
    if format not in ("zarr", "wds"):
        raise ValueError(f"format must be 'zarr' or 'wds', got {format!r}")
    if not (0 <= int(rank) < int(world_size)):
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    norm = normalize_attrs(attrs, num_blocks)
    layout = Layout(
        num_blocks=int(num_blocks),
        token_dtype=token_dtype(norm["codebook_size"]).name,
        world_size=int(world_size),
        extra_fields=normalize_extra_fields(extra_fields),
    )
    # One writer per store (DESIGN §4): lock before looking at, let alone changing, anything.
    lock = acquire(path, rank=int(rank))
    try:
        existing = detect_format(path)
        if existing is not None and existing != format:
            raise StoreError(f"{path} is a {existing} store; rerun with format={existing!r} or use a new path")
        if format == "zarr":
            w: StoreWriter = ZarrWriter(path, norm, layout, int(rank), barrier, commit_every)
        else:
            w = WdsWriter(path, norm, layout, int(rank), barrier, samples_per_shard)
    except BaseException:
        lock.release()
        raise
    w.lock = lock
    w.commit_seconds = commit_seconds
    return w


def finalize(path: str | Path) -> None:
    """Write the single index of a store whose parts are all complete (idempotent).

    Raises:
        StoreError: not a store, or some rank's part is not complete.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt is None:
        raise StoreError(f"{path} is not an evatok token store")
    (finalize_zarr if fmt == "zarr" else finalize_wds)(path)


def open_store(path: str | Path, *, allow_unfinished: bool = False, cache_bytes: int = 64 << 20) -> StoreReader:
    """Open a finished store for reading (format auto-detected).

    Args:
        path: the store directory.
        allow_unfinished: read the committed samples of an unfinished store (debugging).
        cache_bytes: zarr only: LRU cache of decoded token chunks for random access; make it
            larger than the store's tokens to keep them all in memory (wds reads by byte range).

    Raises:
        StoreError: not a store, unfinished (unless allowed), or a corrupted index.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path} does not exist")
    fmt = detect_format(path)
    if fmt is None:
        raise StoreError(f"{path} is not an evatok token store (no zarr.json with evatok attrs, no {INDEX_JSON})")
    if fmt == "zarr":
        reader: StoreReader = ZarrReader(path, allow_unfinished, cache_bytes)
    else:
        reader = WdsReader(path, allow_unfinished)
    if int(reader.attrs.get("evatok_format", -1)) != FORMAT_VERSION:
        raise StoreError(f"{path} has evatok_format {reader.attrs.get('evatok_format')!r}; this reads {FORMAT_VERSION}")
    return reader
