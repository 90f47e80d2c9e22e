"""What both store formats share: the sample record, errors, attrs/layout rules, the writer and
reader base classes (DESIGN §4, docs/formats.md).

Nothing here imports torch, models, video code or the CLI (rule: stores never import models).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.config import save_json

log = logging.getLogger("evatok_cli.store")

FORMAT_VERSION = 1
RESERVED_ATTRS = ("layout", "index", "append")
"""Root keys the store itself manages; caller attrs may not use them."""

LOCATION_ATTRS = ("locations",)
"""Caller attrs that say where things were when the store was started (e.g. ``locations.tokenizer``,
the tokenizer's directory): informative only, so a resume or append from elsewhere does not compare
them (the first run's stay)."""

_KEY_RE = re.compile(r"[^./\\\s]{1,200}")
_FIELD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class StoreError(Exception):
    """A token store cannot be written or read; the message is one line naming the path."""


# ----------------------------------------------------------------------------------------- sample
@dataclass
class Sample:
    """One clip's tokens and metadata: a row of a token store.

    Args:
        key: unique, stable sample id; no dots, slashes or whitespace (see :func:`evatok_cli.video.clip_key`).
        tokens: 1-D ints of length ``sum(block_lengths)``, in block order.
        block_lengths: (T,) tokens per temporal block, equal to the assignment's tuple.
        assignment: index of the assignment in the store's space (DESIGN §3).
        source: where the clip came from (a path or URL), as the user typed it.
        clip_start: first frame index of the clip in the source.
        label: class id, or -1.
        extra: the per-sample fields declared when the writer was opened (fixed dtype and shape).
        video: mp4 bytes of the clip (WebDataset stores only; ``None`` when not stored).
        source_path: ``source`` made absolute when it was written (finds the file from any
            directory); "" when unknown (stores written before it existed, or not a local path).
    """

    key: str
    tokens: np.ndarray
    block_lengths: np.ndarray | tuple[int, ...]
    assignment: int
    source: str
    clip_start: int
    label: int = -1
    extra: dict[str, np.ndarray | float] = field(default_factory=dict)
    video: bytes | None = None
    source_path: str = ""


def check_key(key: str) -> None:
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid sample key {key!r}: 1-200 characters, no dots, slashes or whitespace")


def token_dtype(codebook_size: int) -> np.dtype:
    """uint16, or uint32 when the codebook has more than 65535 entries (DESIGN §4)."""
    return np.dtype(np.uint16 if int(codebook_size) <= 65535 else np.uint32)


# ---------------------------------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    """The writer-side facts of a store that must not change across ranks and resumes."""

    num_blocks: int
    token_dtype: str
    world_size: int
    extra_fields: dict[str, tuple[str, tuple[int, ...]]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_blocks": self.num_blocks,
            "token_dtype": self.token_dtype,
            "world_size": self.world_size,
            "extra_fields": {k: {"dtype": d, "shape": list(s)} for k, (d, s) in self.extra_fields.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Layout:
        return cls(
            num_blocks=int(d["num_blocks"]),
            token_dtype=str(d["token_dtype"]),
            world_size=int(d["world_size"]),
            extra_fields={
                k: (str(v["dtype"]), tuple(int(x) for x in v["shape"])) for k, v in d["extra_fields"].items()
            },
        )


def normalize_extra_fields(extra_fields: dict[str, Any] | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, spec in (extra_fields or {}).items():
        if not isinstance(name, str) or not _FIELD_RE.fullmatch(name):
            raise ValueError(f"invalid extra field name {name!r}: use letters, digits and underscores")
        try:
            dtype, shape = spec
            dt = np.dtype(dtype)
            shape = tuple(int(x) for x in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        except (TypeError, ValueError):
            raise ValueError(f"extra field {name!r}: expected (dtype, shape), got {spec!r}") from None
        if dt.kind not in "biuf" or any(x < 1 for x in shape):
            raise ValueError(f"extra field {name!r}: numeric dtype and positive shape needed, got {dt}, {shape}")
        out[name] = (dt.name, shape)
    return out


def normalize_attrs(attrs: dict[str, Any], num_blocks: int) -> dict[str, Any]:
    """Validate caller attrs and return them JSON-normalised, with ``evatok_format`` set."""
    if not isinstance(attrs, dict):
        raise ValueError("attrs must be a dict")
    clash = [k for k in RESERVED_ATTRS if k in attrs]
    if clash:
        raise ValueError(f"attrs may not use the reserved keys {clash}")
    if attrs.get("evatok_format", FORMAT_VERSION) != FORMAT_VERSION:
        raise ValueError(f"evatok_format must be {FORMAT_VERSION}, got {attrs['evatok_format']!r}")
    for need in ("space", "codebook_size"):
        if need not in attrs:
            raise ValueError(f"attrs need {need!r} (DESIGN §4: tokenizer, space, clip, codebook_size)")
    try:
        norm = json.loads(json.dumps({"evatok_format": FORMAT_VERSION, **attrs}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"attrs must be JSON-serialisable: {e}") from None
    space = AssignmentSpace.from_dict(norm["space"])
    if space.blocks != int(num_blocks):
        raise ValueError(f"num_blocks={num_blocks} but attrs space has {space.blocks} blocks")
    if int(norm["codebook_size"]) < 1:
        raise ValueError(f"codebook_size must be positive, got {norm['codebook_size']}")
    return norm


def comparable_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attrs a reopened store must match: all but :data:`LOCATION_ATTRS`."""
    return {k: v for k, v in attrs.items() if k not in LOCATION_ATTRS}


def describe_mismatch(path: Path, old: dict[str, Any], new: dict[str, Any], what: str) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return (
        f"{path} was written with different {what} (differs in {', '.join(keys)}); "
        "use a new output path rather than mixing tokenizers or settings"
    )


# ---------------------------------------------------------------------------------------- files
def write_json_atomic(path: Path, obj: Any) -> None:
    """Store JSON (compact), written atomically by :func:`evatok_cli.config.save_json`."""
    save_json(path, obj, compact=True)


def is_lock_file(name: str) -> bool:
    """Files of the store lock (``.evatok.lock*``, see :mod:`evatok_cli.store.lock`): not store data."""
    return name.startswith(".evatok.lock")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"{path.parent} is not a token store: {path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{path.parent} has a corrupted {what} ({path.name}: {e})") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path.parent} has a corrupted {what} ({path.name} is not a JSON object)")
    return obj


def unfinished_message(path: Path, complete: int, total: int) -> str:
    return (
        f"{path} is unfinished: {complete} of {total} parts complete; rerun the same command to resume "
        "(or open_store(path, allow_unfinished=True) to read the committed samples)"
    )


# ---------------------------------------------------------------------------------------- writer
class StoreWriter(ABC):
    """Appends samples of one rank to a store; see :func:`evatok_cli.store.open_writer`.

    Attributes:
        done_keys: keys this rank committed in an earlier, interrupted run of the same command (all
            keys of the store when it is finished). Skip them and feed the rest in the same
            deterministic order as the first run: the resumed store then equals an uninterrupted one.
        failed_sources: sources this rank already recorded as failures (skip them too).
        finished: the store already has its final index; appends are refused.
    """

    accepts_video = True
    """Whether samples may carry mp4 bytes (wds only)."""

    def __init__(
        self,
        path: Path,
        attrs: dict[str, Any],
        layout: Layout,
        rank: int,
        barrier: Callable[[], Any] | None,
    ) -> None:
        self.path = path
        self.attrs = attrs
        self.layout = layout
        self.rank = rank
        self.barrier = barrier
        self.space = AssignmentSpace.from_dict(attrs["space"])
        self.codebook_size = int(attrs["codebook_size"])
        self.dtype = np.dtype(layout.token_dtype)
        self.done_keys: set[str] = set()
        self.failed_sources: set[str] = set()
        self.finished = False
        self._part_complete = False
        self._seen: set[str] = set()
        self._failures: dict[str, str] = {}
        self._closed = False
        self.commit_seconds: float | None = None
        self._pending_since: float | None = None  # when the oldest uncommitted sample came
        self.lock: Any = None  # the store lock (evatok_cli.store.lock), released on close/abort

    # -- public API
    def append(self, samples: Sequence[Sample]) -> None:
        """Validate and add samples (committed when a batch/shard fills, on flush() and on close())."""
        if self.finished:
            raise StoreError(f"{self.path} is finished; nothing to append (check writer.finished first)")
        if self._closed:
            raise StoreError(f"{self.path}: writer of rank {self.rank} is closed")
        rows = [self._validate(s) for s in samples]
        keys: set[str] = set()
        for r in rows:
            if r.key in self._seen or r.key in keys:
                where = "committed by an earlier run" if r.key in self.done_keys else "already appended"
                raise StoreError(f"{self.path}: sample key {r.key!r} is {where} (skip writer.done_keys)")
            if self._part_complete:
                raise StoreError(
                    f"{self.path}: part of rank {self.rank} is complete but key {r.key!r} is new; "
                    "the inputs differ from the run that wrote it"
                )
            keys.add(r.key)
        self._seen |= keys
        if rows and self._pending_since is None:
            self._pending_since = time.monotonic()
        self._add(rows)
        if (
            self.commit_seconds is not None
            and self._pending_since is not None
            and time.monotonic() - self._pending_since >= self.commit_seconds
        ):
            self.flush()

    def add_failure(self, source: str, reason: str) -> None:
        """Record that ``source`` (or some of its clips) yielded no samples and why (one entry per
        source: the first reason is kept)."""
        if self.finished or self._closed:
            raise StoreError(f"{self.path}: writer of rank {self.rank} is finished or closed")
        reason = " ".join(str(reason).split())
        self._failures.setdefault(str(source), reason)
        self.failed_sources.add(str(source))
        self._failures_changed()

    @property
    def failures(self) -> list[tuple[str, str]]:
        return list(self._failures.items())

    def start_append(self) -> None:
        """Reopen a finished store to append new samples as new parts (DESIGN §4: more inputs append).

        Every rank of the job must call it (it is collective in effect: each rank opens its own new
        part, numbered after the store's existing parts, and close() writes an index of old and new
        parts). ``done_keys`` keeps every key already in the store, so appending one again is refused.
        Until the new index is written, readers see the store as it was; a killed append resumes.
        """
        if not self.finished:
            raise StoreError(f"{self.path}: start_append() needs a finished store (this one is being written)")
        if self._closed:
            raise StoreError(f"{self.path}: writer of rank {self.rank} is closed")
        old = set(self.done_keys)
        self._start_append()
        self.finished = False
        self.done_keys |= old
        self._seen |= old

    @abstractmethod
    def flush(self) -> None:
        """Commit everything appended so far (durable against a kill once this returns)."""

    def _committed_all(self) -> None:
        """Formats call this when nothing appended is left uncommitted."""
        self._pending_since = None

    @property
    @abstractmethod
    def committed(self) -> int:
        """Samples of this rank committed so far (including earlier runs)."""

    def close(self) -> None:
        """Commit, mark this rank's part complete, then write the index when every part is.

        With ``world_size > 1`` and a ``barrier``, all ranks wait at the barrier and rank 0 writes
        the index. Without a barrier, whichever rank sees every part complete writes it (identical
        content, atomic rename, so concurrent writers are harmless) and :func:`finalize` is the
        explicit alternative.
        """
        if self._closed:
            return
        try:
            self._close()
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _close(self) -> None:
        if self.finished:
            self._closed = True
            return
        if not self._part_complete:
            self.flush()
            self._complete_part()
            self._part_complete = True
        self._closed = True
        if self.layout.world_size == 1:
            self._finalize()
        elif self.barrier is not None:
            self.barrier()
            if self.rank == 0:
                self._finalize()
        elif self._all_parts_complete():
            self._finalize()
        self.finished = self._is_finalized()

    def abort(self) -> None:
        """Drop what is not committed and close without completing the part."""
        self._closed = True
        self._release_lock()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # Keep what was committed; the rerun resumes from there.
            try:
                if not self.finished and not self._closed:
                    self.flush()
            finally:
                self.abort()

    # -- format hooks
    @abstractmethod
    def _start_append(self) -> None: ...

    @abstractmethod
    def _add(self, rows: list[Sample]) -> None: ...

    def _failures_changed(self) -> None:
        """Called after add_failure; formats commit failures with their next commit."""

    @abstractmethod
    def _complete_part(self) -> None: ...

    @abstractmethod
    def _all_parts_complete(self) -> bool: ...

    @abstractmethod
    def _finalize(self) -> None: ...

    @abstractmethod
    def _is_finalized(self) -> bool: ...

    # -- validation
    def _validate(self, s: Sample) -> Sample:
        if not isinstance(s, Sample):
            raise TypeError(f"expected Sample, got {type(s).__name__}")
        check_key(s.key)
        bl = np.asarray(s.block_lengths)
        if bl.shape != (self.layout.num_blocks,) or bl.dtype.kind not in "iu":
            raise ValueError(f"sample {s.key}: block_lengths must be {self.layout.num_blocks} ints, got {bl!r}")
        a = int(s.assignment)
        if not 0 <= a < len(self.space):
            raise ValueError(f"sample {s.key}: assignment {a} out of range [0, {len(self.space)})")
        if tuple(int(x) for x in bl) != self.space.to_tuple(a):
            raise ValueError(
                f"sample {s.key}: block_lengths {tuple(int(x) for x in bl)} != assignment {a} "
                f"= {self.space.to_tuple(a)}"
            )
        tok = np.asarray(s.tokens)
        if tok.ndim != 1 or (tok.size and tok.dtype.kind not in "iu"):
            raise ValueError(f"sample {s.key}: tokens must be a 1-D integer array, got {tok.dtype} {tok.shape}")
        if tok.size != int(bl.sum()):
            raise ValueError(f"sample {s.key}: {tok.size} tokens but block_lengths sum to {int(bl.sum())}")
        if tok.size and (int(tok.min()) < 0 or int(tok.max()) >= self.codebook_size):
            raise ValueError(f"sample {s.key}: token ids must be in [0, {self.codebook_size})")
        extra: dict[str, np.ndarray] = {}
        if set(s.extra) != set(self.layout.extra_fields):
            raise ValueError(
                f"sample {s.key}: extra fields {sorted(s.extra)} != declared {sorted(self.layout.extra_fields)}"
            )
        for name, (dt, shape) in self.layout.extra_fields.items():
            v = np.asarray(s.extra[name], dtype=dt)
            if v.shape != shape:
                raise ValueError(f"sample {s.key}: extra field {name!r} has shape {v.shape}, declared {shape}")
            extra[name] = v
        if s.video is not None:
            if not self.accepts_video:
                raise ValueError(f"sample {s.key}: zarr stores do not hold video; use format='wds' to keep mp4 bytes")
            if not isinstance(s.video, (bytes, bytearray, memoryview)):
                raise ValueError(f"sample {s.key}: video must be mp4 bytes or None")
        return Sample(
            key=s.key,
            tokens=tok.astype(self.dtype, copy=False),
            block_lengths=bl.astype(np.uint16),
            assignment=a,
            source=str(s.source),
            clip_start=int(s.clip_start),
            label=int(s.label),
            extra=extra,
            video=None if s.video is None else bytes(s.video),
            source_path=str(s.source_path or ""),
        )


# ---------------------------------------------------------------------------------------- reader
class StoreReader(ABC):
    """Read access to a finished store, whatever its format; see :func:`evatok_cli.store.open_store`.

    Per-sample metadata (keys, assignments, block lengths, labels) is held in memory; tokens and
    extra fields are read in chunks.
    """

    format: str
    path: Path
    attrs: dict[str, Any]
    layout: Layout
    failures: list[tuple[str, str]]
    keys: list[str]
    _assignment: np.ndarray
    _block_lengths: np.ndarray
    _label: np.ndarray
    _key_index: dict[str, int] | None = None

    # -- sizes and columns
    def __len__(self) -> int:
        return len(self.keys)

    @property
    def space(self) -> AssignmentSpace:
        return AssignmentSpace.from_dict(self.attrs["space"])

    @property
    def extra_fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return dict(self.layout.extra_fields)

    def assignments(self) -> np.ndarray:
        """(N,) int32 assignment indices."""
        return self._assignment.copy()

    def block_lengths(self) -> np.ndarray:
        """(N, T) tokens per block."""
        return self._block_lengths.copy()

    def lengths(self) -> np.ndarray:
        """(N,) int64 tokens per sample."""
        return self._block_lengths.sum(axis=1, dtype=np.int64)

    def labels(self) -> np.ndarray:
        """(N,) int32 class ids (-1 = none)."""
        return self._label.copy()

    # -- samples
    def __getitem__(self, i: int) -> Sample:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sample index {i} out of range for a store of {n} samples")
        return self._get(i)

    def get(self, key: str) -> Sample:
        """The sample with this key (KeyError if absent)."""
        if self._key_index is None:
            self._key_index = {k: i for i, k in enumerate(self.keys)}
        return self._get(self._key_index[key])

    def __contains__(self, key: object) -> bool:
        if self._key_index is None:
            self._key_index = {k: i for i, k in enumerate(self.keys)}
        return key in self._key_index

    def __iter__(self) -> Iterator[Sample]:
        return self.iter_range(0, len(self))

    def block_tokens(self, i: int) -> list[np.ndarray]:
        """Sample ``i``'s tokens split into its T per-block arrays."""
        s = self[i]
        return np.split(np.asarray(s.tokens), np.cumsum(np.asarray(s.block_lengths, dtype=np.int64))[:-1])

    @abstractmethod
    def _get(self, i: int) -> Sample: ...

    @abstractmethod
    def iter_range(self, start: int, stop: int) -> Iterator[Sample]:
        """Samples ``start..stop-1`` in order, read in chunks."""

    @abstractmethod
    def units(self) -> list[tuple[int, int]]:
        """[start, stop) ranges that are cheap to read as a whole (zarr windows, wds shards)."""

    # -- summary
    def stats(self) -> dict[str, Any]:
        """What ``evatok info`` shows: counts, token statistics, common assignments, metadata."""
        lengths = self.lengths()
        n = len(self)
        counts = np.bincount(self._assignment, minlength=1) if n else np.zeros(1, dtype=np.int64)
        order = np.lexsort((np.arange(counts.size), -counts))[:10]
        space = self.space
        top = [(list(space.to_tuple(int(a))), int(counts[a])) for a in order if counts[a] > 0]
        return {
            "format": self.format,
            "samples": n,
            "total_tokens": int(lengths.sum()),
            "mean_tokens": float(lengths.mean()) if n else 0.0,
            "min_tokens": int(lengths.min()) if n else 0,
            "max_tokens": int(lengths.max()) if n else 0,
            "mean_tokens_per_block": [float(x) for x in self._block_lengths.mean(axis=0)]
            if n
            else [0.0] * self.layout.num_blocks,
            "top_assignments": top,
            "extra_fields": {k: [d, list(s)] for k, (d, s) in self.layout.extra_fields.items()},
            "failures": len(self.failures),
            "metadata": self.attrs,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, samples={len(self)})"


def window_ranges(start: int, stop: int, bounds: Sequence[int], max_samples: int) -> Iterator[tuple[int, int]]:
    """Split [start, stop) at part boundaries ``bounds`` (cumulative starts) and every max_samples."""
    b = list(bounds)
    i = start
    while i < stop:
        p = int(np.searchsorted(b, i, side="right")) - 1
        end = min(stop, b[p + 1] if p + 1 < len(b) else stop, i + max_samples)
        yield i, end
        i = end


def approx_items(nbytes_target: int, item_bytes: int) -> int:
    """A power of two near nbytes_target / item_bytes (>= 1)."""
    n = max(1, nbytes_target // max(1, item_bytes))
    return 1 << max(0, int(math.log2(n)))
