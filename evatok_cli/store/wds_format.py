"""Token store format v1 as WebDataset tar shards (``--format wds``; DESIGN §4, docs/formats.md).

Layout::

    out/
      store.json                  attrs + layout, written when the first rank starts
      part-RRRRR.json             rank R's committed shards (names, counts, keys, columns), failures
      shard-RRRRR-NNNNNN.tar      complete shard NNNNNN of rank R
      shard-RRRRR-NNNNNN.tar.tmp  the shard rank R is writing now
      index.json                  the single index, written once every rank is complete

Per sample: ``KEY.tokens.npy`` (uint16|uint32), ``KEY.json`` (block_lengths, assignment, source,
source_path, clip_start, label, extra{name: list}), ``KEY.mp4`` when the sample carries video bytes.

Commit protocol: a shard is written under ``.tar.tmp``, closed, renamed to ``.tar``, and only then
listed in ``part-RRRRR.json`` (rewritten atomically). A reopened rank deletes its shards and temp
files that its part file does not list; their samples are redone.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from evatok_cli.store.common import (
    Layout,
    Sample,
    StoreError,
    StoreReader,
    StoreWriter,
    comparable_attrs,
    describe_mismatch,
    is_lock_file,
    log,
    read_json,
    unfinished_message,
    write_json_atomic,
)

STORE_JSON = "store.json"
INDEX_JSON = "index.json"


def part_json(rank: int) -> str:
    return f"part-{rank:05d}.json"


def shard_name(rank: int, n: int) -> str:
    return f"shard-{rank:05d}-{n:06d}.tar"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> list[int]:
    """Append a member; returns [byte offset of its data in the tar, size] for random access."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0  # byte-identical shards across runs
    tar.addfile(info, io.BytesIO(data))
    padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return [tar.offset - padded, len(data)]


def _index_parts(index: dict[str, Any]) -> list[str]:
    """The part files an index was made from (indexes before appends: one per rank)."""
    if "parts" in index:
        return [str(p) for p in index["parts"]]
    return [part_json(r) for r in range(int(index["layout"]["world_size"]))]


def _appending(meta: dict[str, Any]) -> dict[str, int] | None:
    """{base, world_size} of an append in progress (store.json ``append``), else None."""
    app = meta.get("append")
    return None if not app else {"base": int(app["base"]), "world_size": int(app["world_size"])}


def _pending_parts(path: Path, meta: dict[str, Any]) -> list[int]:
    """Part numbers being written now: the first run's ranks, or those of an append in progress."""
    app = _appending(meta)
    if app is not None:
        return [app["base"] + r for r in range(app["world_size"])]
    if (path / INDEX_JSON).is_file():
        return []
    return list(range(int(meta["layout"]["world_size"])))


def is_wds_store(path: Path) -> bool:
    return (Path(path) / STORE_JSON).is_file() or (Path(path) / INDEX_JSON).is_file()


# ---------------------------------------------------------------------------------------- writer
class WdsWriter(StoreWriter):
    """One rank's writer: shards ``shard-RRRRR-*.tar`` of ``samples_per_shard`` samples."""

    def __init__(
        self,
        path: Path,
        attrs: dict[str, Any],
        layout: Layout,
        rank: int,
        barrier: Callable[[], Any] | None,
        samples_per_shard: int,
    ) -> None:
        super().__init__(path, attrs, layout, rank, barrier)
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.samples_per_shard = samples_per_shard
        self._tar: tarfile.TarFile | None = None
        self._cur: list[tuple[str, list[int], int, int, list[int]]] = []
        self._failures_dirty = False
        self.part_id = rank  # part-RRRRR.json / shard-RRRRR-* this writer writes (base + rank when appending)
        meta = self._open_root()
        if (path / INDEX_JSON).is_file():
            reader = WdsReader(path)
            old_keys = set(reader.keys)
            app = _appending(meta)
            if app is None or part_json(app["base"]) in _index_parts(read_json(path / INDEX_JSON, "index")):
                self.finished = True
                self.done_keys = old_keys
                self._seen = set(old_keys)
                self.failed_sources = {s for s, _ in reader.failures}
                return
            if app["world_size"] != self.layout.world_size:
                raise StoreError(
                    f"{path} is being appended to with world_size={app['world_size']}, this run has "
                    f"{self.layout.world_size}; resume with the same number of processes"
                )
            self.part_id = app["base"] + rank
            self._open_part()
            self.done_keys |= old_keys
            self._seen |= old_keys
            self.failed_sources |= {s for s, _ in reader.failures}
            return
        self._open_part()

    def _start_append(self) -> None:
        meta = read_json(self.path / STORE_JSON, "store header")
        index = read_json(self.path / INDEX_JSON, "index")
        want = {"base": len(_index_parts(index)), "world_size": self.layout.world_size}
        if _appending(meta) != want:
            # every rank writes the same value (atomic rename), whichever comes first
            write_json_atomic(self.path / STORE_JSON, {**meta, "append": want})
        self.part_id = want["base"] + self.rank
        self.done_keys = set()
        self._open_part()
        log.info("%s: appending as %s after %d parts", self.path, part_json(self.part_id), want["base"])

    def _open_root(self) -> dict[str, Any]:
        path = self.path
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} exists and is not a directory")
        meta_path = path / STORE_JSON
        if not meta_path.is_file():
            if path.is_dir():
                junk = [p.name for p in path.iterdir() if not p.name.endswith(".partial") and not is_lock_file(p.name)]
                # Another rank may have created the store meanwhile: its files are not junk.
                if junk and not meta_path.is_file():
                    raise StoreError(f"{path} exists and is not an evatok token store (contains {junk[0]!r})")
            path.mkdir(parents=True, exist_ok=True)
            # Several ranks may create it at once: identical content, atomic rename.
            write_json_atomic(meta_path, {"attrs": self.attrs, "layout": self.layout.to_dict()})
        meta = read_json(meta_path, "store header")
        old_attrs = comparable_attrs(meta.get("attrs") or {})
        if old_attrs != comparable_attrs(self.attrs):
            raise StoreError(describe_mismatch(path, old_attrs, comparable_attrs(self.attrs), "attrs"))
        finished = (path / INDEX_JSON).is_file()
        a, b = dict(meta.get("layout") or {}), self.layout.to_dict()
        if finished:
            a.pop("world_size", None), b.pop("world_size")
        if a != b:
            if not finished and {**a, "world_size": 0} == {**b, "world_size": 0}:
                raise StoreError(
                    f"{path} was started with world_size={a['world_size']}, this run has "
                    f"{self.layout.world_size}; resume with the same number of processes"
                )
            raise StoreError(describe_mismatch(path, a, b, "layout (blocks, token dtype, extra fields)"))
        return meta

    def _open_part(self) -> None:
        pj = self.path / part_json(self.part_id)
        if pj.is_file():
            state = read_json(pj, "part file")
        else:
            state = {"rank": self.rank, "part": self.part_id, "shards": [], "failures": [], "complete": False}
        self._state = state
        self._part_complete = bool(state.get("complete"))
        self._failures = {str(s): str(r) for s, r in state.get("failures", [])}
        self.failed_sources = set(self._failures)
        listed = {s["name"] for s in state["shards"]}
        # Drop what a killed run left behind: temp shards and shards renamed but never listed.
        for f in self.path.glob(f"shard-{self.part_id:05d}-*.tar*"):
            if f.name not in listed:
                f.unlink(missing_ok=True)
        for f in self.path.glob(".*.partial"):
            if f.name.startswith(f".{part_json(self.part_id)}."):
                f.unlink(missing_ok=True)
        self.done_keys = {k for s in state["shards"] for k in s["keys"]}
        self._seen = set(self.done_keys)
        if self.done_keys:
            log.info("%s: resuming %s after %d committed samples", self.path, pj.name, len(self.done_keys))

    @property
    def committed(self) -> int:
        if self.finished:
            return len(self.done_keys)
        return sum(int(s["samples"]) for s in self._state["shards"])

    def _add(self, rows: list[Sample]) -> None:
        for r in rows:
            if self._tar is None:
                self._tmp = self.path / (shard_name(self.part_id, len(self._state["shards"])) + ".tmp")
                self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)
            self._write_sample(r)
            if len(self._cur) >= self.samples_per_shard:
                self._close_shard()
        if not self._cur:
            self._committed_all()

    def _write_sample(self, r: Sample) -> None:
        assert self._tar is not None
        meta = {
            "block_lengths": [int(x) for x in r.block_lengths],
            "assignment": r.assignment,
            "source": r.source,
            "source_path": r.source_path,
            "clip_start": r.clip_start,
            "label": r.label,
            "extra": {k: v.tolist() for k, v in r.extra.items()},
        }
        members = _add_member(self._tar, f"{r.key}.tokens.npy", _npy_bytes(r.tokens))
        members += _add_member(self._tar, f"{r.key}.json", json.dumps(meta, separators=(",", ":")).encode())
        if r.video is not None:
            members += _add_member(self._tar, f"{r.key}.mp4", r.video)
        # The index columns of the shard being written (not the tokens).
        self._cur.append((r.key, [int(x) for x in r.block_lengths], r.assignment, r.label, members))

    def _close_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        self._tar = None
        final = self._tmp.with_name(self._tmp.name.removesuffix(".tmp"))
        self._tmp.replace(final)
        cur, self._cur = self._cur, []
        self._state["shards"].append(
            {
                "name": final.name,
                "samples": len(cur),
                "tokens": sum(sum(c[1]) for c in cur),
                "keys": [c[0] for c in cur],
                "assignment": [c[2] for c in cur],
                "block_lengths": [c[1] for c in cur],
                "label": [c[3] for c in cur],
                "members": [c[4] for c in cur],
            }
        )
        self._write_state()

    def _write_state(self) -> None:
        self._state["failures"] = [list(x) for x in self._failures.items()]
        write_json_atomic(self.path / part_json(self.part_id), self._state)
        self._failures_dirty = False

    def _failures_changed(self) -> None:
        self._failures_dirty = True

    def flush(self) -> None:
        """Close the current shard early (a smaller shard) so everything appended is committed."""
        if self.finished:
            return
        if self._cur:
            self._close_shard()
        elif self._failures_dirty:
            self._write_state()
        self._committed_all()

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            self._tmp.unlink(missing_ok=True)
        super().abort()

    def _complete_part(self) -> None:
        self._state["complete"] = True
        self._write_state()

    def _all_parts_complete(self) -> bool:
        meta = read_json(self.path / STORE_JSON, "store header")
        return all(_rank_complete(self.path, r) for r in _pending_parts(self.path, meta))

    def _finalize(self) -> None:
        finalize_wds(self.path)

    def _is_finalized(self) -> bool:
        return (self.path / INDEX_JSON).is_file() and _appending(
            read_json(self.path / STORE_JSON, "store header")
        ) is None


def _rank_complete(path: Path, rank: int) -> bool:
    try:
        return bool(json.loads((path / part_json(rank)).read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def finalize_wds(path: Path) -> None:
    """Write ``index.json`` once every rank's part is complete (idempotent)."""
    meta = read_json(path / STORE_JSON, "store header")
    app = _appending(meta)
    has_index = (path / INDEX_JSON).is_file()
    if has_index and app is None:
        return
    old = read_json(path / INDEX_JSON, "index") if has_index else {"shards": [], "failures": [], "parts": []}
    pending = _pending_parts(path, meta)
    if has_index and part_json(pending[0]) in _index_parts(old):
        # killed after writing the new index but before ending the append: just end it
        write_json_atomic(path / STORE_JSON, {k: v for k, v in meta.items() if k != "append"})
        return
    done = [r for r in pending if _rank_complete(path, r)]
    if len(done) != len(pending):
        raise StoreError(unfinished_message(path, len(done), len(pending)))
    shards, failures = list(old["shards"]), list(old.get("failures", []))
    owner = {k: s["name"] for s in shards for k in s["keys"]}
    for r in pending:
        state = read_json(path / part_json(r), "part file")
        for s in state["shards"]:
            if not (path / s["name"]).is_file():
                raise StoreError(f"{path}: shard {s['name']} listed by {part_json(r)} is missing")
            for k in s["keys"]:
                if k in owner:
                    raise StoreError(f"{path}: sample key {k!r} is in {owner[k]} and {s['name']}; parts overlap")
                owner[k] = s["name"]
        shards += state["shards"]
        failures += state.get("failures", [])
    index = {
        "evatok_format": meta["attrs"]["evatok_format"],
        "attrs": meta["attrs"],
        "layout": meta["layout"],
        "samples": sum(int(s["samples"]) for s in shards),
        "tokens": sum(int(s["tokens"]) for s in shards),
        "shards": shards,
        "failures": failures,
        "parts": (_index_parts(old) if has_index else []) + [part_json(r) for r in pending],
    }
    write_json_atomic(path / INDEX_JSON, index)
    if app is not None:
        write_json_atomic(path / STORE_JSON, {k: v for k, v in meta.items() if k != "append"})
    log.info("%s: finished, %d samples in %d shards", path, index["samples"], len(shards))


# ---------------------------------------------------------------------------------------- reader
_EXTS = ("tokens.npy", "json", "mp4")  # the order of a sample's members (index ``members``)

_NPY_HEADER = re.compile(
    r"\{'descr': '(?P<descr>[<>|][a-z]\d+)', 'fortran_order': False, 'shape': \((?P<n>\d+),\), \}\s*"
)


def _load_npy(buf: bytes | memoryview) -> np.ndarray:
    """A 1-D .npy as written by np.save; parsing its header directly is ~10x faster than np.load."""
    b = memoryview(buf)
    if bytes(b[:8]) == b"\x93NUMPY\x01\x00":
        hlen = int.from_bytes(b[8:10], "little")
        m = _NPY_HEADER.fullmatch(bytes(b[10 : 10 + hlen]).decode("latin1"))
        if m is not None:
            return np.frombuffer(b, dtype=np.dtype(m["descr"]), count=int(m["n"]), offset=10 + hlen)
    return np.load(io.BytesIO(bytes(b)), allow_pickle=False)


def _decode(tar_path: Path, key: str, parts: dict[str, Any], dtype: np.dtype, extra_fields: dict[str, Any]) -> Sample:
    try:
        tokens = _load_npy(parts["tokens.npy"])
        meta = json.loads(bytes(parts["json"]))
    except (KeyError, ValueError) as e:
        raise StoreError(f"{tar_path}: sample {key!r} is incomplete or corrupted ({e!r})") from None
    return Sample(
        key=key,
        tokens=tokens.astype(dtype),  # a copy: never a view into a whole shard's buffer
        block_lengths=np.asarray(meta["block_lengths"], dtype=np.uint16),
        assignment=int(meta["assignment"]),
        source=str(meta["source"]),
        clip_start=int(meta["clip_start"]),
        label=int(meta["label"]),
        extra={
            k: np.asarray(v, dtype=extra_fields[k][0] if k in extra_fields else None)
            for k, v in meta.get("extra", {}).items()
        },
        video=bytes(parts["mp4"]) if "mp4" in parts else None,
        source_path=str(meta.get("source_path", "")),
    )


class WdsReader(StoreReader):
    """Reads a finished WebDataset store through ``index.json`` (or committed shards when asked).

    Members are read by the byte ranges the index records (``members``), so random access reads
    one sample and streaming reads each shard once, without parsing tar headers.
    """

    format = "wds"

    def __init__(self, path: str | Path, allow_unfinished: bool = False) -> None:
        self.path = Path(path)
        self.allow_unfinished = allow_unfinished
        if (self.path / INDEX_JSON).is_file():
            index = read_json(self.path / INDEX_JSON, "index")
            try:
                attrs, layout, shards = index["attrs"], Layout.from_dict(index["layout"]), index["shards"]
                failures = index.get("failures", [])
            except (KeyError, TypeError, ValueError) as e:
                raise StoreError(f"{self.path} has a corrupted index ({INDEX_JSON}: {e!r})") from None
            app = _appending(read_json(self.path / STORE_JSON, "store header")) if allow_unfinished else None
            if app is not None and part_json(app["base"]) not in _index_parts(index):
                shards, failures = list(shards), list(failures)  # an append in progress: add what it committed
                for r in range(app["base"], app["base"] + app["world_size"]):
                    if (self.path / part_json(r)).is_file():
                        state = read_json(self.path / part_json(r), "part file")
                        shards += state["shards"]
                        failures += state.get("failures", [])
        else:
            meta = read_json(self.path / STORE_JSON, "store header")
            attrs, layout = meta["attrs"], Layout.from_dict(meta["layout"])
            pending = _pending_parts(self.path, meta)
            if not allow_unfinished:
                done = sum(_rank_complete(self.path, r) for r in pending)
                raise StoreError(unfinished_message(self.path, done, len(pending)))
            shards, failures = [], []
            for r in pending:
                if (self.path / part_json(r)).is_file():
                    state = read_json(self.path / part_json(r), "part file")
                    shards += state["shards"]
                    failures += state.get("failures", [])
        self.attrs, self.layout = attrs, layout
        self.failures = [(str(s), str(r)) for s, r in failures]
        self._dtype = np.dtype(layout.token_dtype)
        T = layout.num_blocks
        try:
            self._shards = [(str(s["name"]), int(s["samples"])) for s in shards]
            self.keys = [str(k) for s in shards for k in s["keys"]]
            self._assignment = np.array([a for s in shards for a in s["assignment"]], dtype=np.int32)
            bl = [b for s in shards for b in s["block_lengths"]]
            self._block_lengths = np.array(bl, dtype=np.uint16).reshape(-1, T)
            self._label = np.array([x for s in shards for x in s["label"]], dtype=np.int32)
            self._members = [[int(x) for x in m] for s in shards for m in s["members"]]
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"{self.path} has a corrupted index ({e!r})") from None
        columns = (self._assignment, self._block_lengths, self._label, self._members)
        if any(len(c) != len(self.keys) for c in columns):
            raise StoreError(f"{self.path} has a corrupted index (column lengths differ)")
        self._starts = np.cumsum([0] + [n for _, n in self._shards])

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "allow_unfinished": self.allow_unfinished}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["allow_unfinished"])

    @property
    def shards(self) -> list[Path]:
        """The shard files, in index order (pass them to ``webdataset.WebDataset``)."""
        return [self.path / name for name, _ in self._shards]

    def _rows(self, s: int, lo: int, hi: int) -> Iterator[Sample]:
        """Samples lo..hi-1 (global indices) of shard s, from one read of their byte range."""
        path = self.path / self._shards[s][0]
        spans = [self._members[i] for i in range(lo, hi)]
        a = min(m[0] for m in spans)
        b = max(m[j] + m[j + 1] for m in spans for j in range(0, len(m), 2))
        try:
            with open(path, "rb") as f:
                f.seek(a)
                buf = memoryview(f.read(b - a))
        except OSError as e:
            raise StoreError(f"{path}: cannot read shard ({e})") from None
        if len(buf) != b - a:
            raise StoreError(f"{path}: shard is truncated (index says {b} bytes or more)")
        for i, m in zip(range(lo, hi), spans):
            parts = {ext: buf[off - a : off - a + size] for ext, off, size in zip(_EXTS, m[::2], m[1::2])}
            yield _decode(path, self.keys[i], parts, self._dtype, self.layout.extra_fields)

    def _get(self, i: int) -> Sample:
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return next(self._rows(s, i, i + 1))

    def iter_range(self, start: int, stop: int) -> Iterator[Sample]:
        start, stop = max(0, int(start)), min(len(self), int(stop))
        if start >= stop:
            return
        s0 = int(np.searchsorted(self._starts, start, side="right")) - 1
        for s in range(s0, len(self._shards)):
            lo, hi = max(start, int(self._starts[s])), min(stop, int(self._starts[s + 1]))
            if lo >= stop:
                break
            if lo < hi:
                yield from self._rows(s, lo, hi)

    def units(self) -> list[tuple[int, int]]:
        return [(int(self._starts[s]), int(self._starts[s + 1])) for s in range(len(self._shards))]
