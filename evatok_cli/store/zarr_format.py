"""Token store format v1 on Zarr v3 (the default; DESIGN §4, docs/formats.md).

Layout::

    out.zarr/                 root group; attrs = caller attrs + layout{} (+ index{} once finished)
      part-00000/             one group per rank, written by that rank only
        tokens                uint16|uint32 (total,)  sharded (2^20-token shards of 2^16-token chunks), zstd
        offsets               int64 (N+1,)            sample i = tokens[offsets[i]:offsets[i+1]]
        block_lengths         uint16 (N, T)
        assignment, label     int32 (N,)
        clip_start            int64 (N,)
        key, source           string (N,)
        source_path           string (N,)             absolute source ("" if unknown; absent in older stores)
        extra/NAME            declared dtype (N, *shape)
        attrs: rank, committed{samples, tokens}, complete, failures[[source, reason]]

Commit protocol (safe against SIGKILL at any instant): a commit grows the arrays and writes the new
rows beyond the committed end, then rewrites the part attrs with the new ``committed`` counts, last.
zarr's LocalStore replaces every file through a temporary name and a rename, so each file is
always either its old or its new version. A reopened part shrinks its arrays back to ``committed``,
which drops anything a killed run wrote after its last commit.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.errors import ContainsArrayError, ContainsGroupError

from evatok_cli.store.common import (
    Layout,
    Sample,
    StoreError,
    StoreReader,
    StoreWriter,
    approx_items,
    comparable_attrs,
    describe_mismatch,
    is_lock_file,
    log,
    unfinished_message,
    window_ranges,
)

TOKEN_CHUNK = 1 << 16
TOKEN_SHARD = 1 << 20
ROW_CHUNK = 1 << 16
STR_CHUNK = 1 << 14
READ_WINDOW = 1024
UNIT = 256
_COLUMNS = ("tokens", "offsets", "block_lengths", "assignment", "label", "clip_start", "key", "source")
_OPTIONAL = ("source_path",)  # columns added after format v1 shipped: parts written before lack them


def part_name(rank: int) -> str:
    return f"part-{rank:05d}"


def read_root_meta(path: Path) -> dict[str, Any] | None:
    """The root zarr.json's attributes if ``path`` looks like an evatok zarr store, else None."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} has a corrupted zarr.json ({e})") from None
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    if not isinstance(attrs, dict) or doc.get("node_type") != "group" or "evatok_format" not in attrs:
        return None
    return attrs


def _user_attrs(root_attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in root_attrs.items() if k not in ("layout", "index", "append")}


def _appending(root_attrs: dict[str, Any]) -> dict[str, int] | None:
    """{base, world_size} of an append in progress (new parts base..base+world_size-1), else None."""
    app = root_attrs.get("append")
    if not app or "index" not in root_attrs:
        return None
    return {"base": int(app["base"]), "world_size": int(app["world_size"])}


def _pending_parts(root_attrs: dict[str, Any]) -> list[str]:
    """The parts being written now: the first run's, or those of an append in progress."""
    app = _appending(root_attrs)
    if app is not None:
        return [part_name(app["base"] + r) for r in range(app["world_size"])]
    if "index" in root_attrs:
        return []
    return [part_name(r) for r in range(int(root_attrs["layout"]["world_size"]))]


def _layout(path: Path, root_attrs: dict[str, Any]) -> Layout:
    try:
        return Layout.from_dict(root_attrs["layout"])
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"{path} has a corrupted layout in its root attrs ({e!r})") from None


def _open(path: Path, node: str, mode: str = "r"):
    try:
        return zarr.open_group(str(path), path=node, mode=mode) if node else zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        raise StoreError(f"{path}: cannot open {node or 'root group'} ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------- writer
class ZarrWriter(StoreWriter):
    """One rank's writer: appends to ``part-RRRRR/`` (see the module docstring for the protocol)."""

    accepts_video = False

    def __init__(
        self,
        path: Path,
        attrs: dict[str, Any],
        layout: Layout,
        rank: int,
        barrier: Callable[[], Any] | None,
        commit_every: int,
    ) -> None:
        super().__init__(path, attrs, layout, rank, barrier)
        if commit_every < 1:
            raise ValueError(f"commit_every must be >= 1, got {commit_every}")
        self.commit_every = commit_every
        self._buf: list[Sample] = []
        self._failures_dirty = False
        self.part_id = rank  # part-RRRRR this writer writes (base + rank when appending)
        root_attrs = self._open_root()
        if "index" in root_attrs:
            reader = ZarrReader(path)
            old_keys = set(reader.keys)
            app = _appending(root_attrs)
            if app is None:
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
        root = _open(self.path, "", mode="r+")
        index = root.attrs["index"]
        want = {"base": len(index["parts"]), "world_size": self.layout.world_size}
        if _appending(dict(root.attrs)) != want:
            # every rank writes the same value (atomic rename), whichever comes first
            root.attrs.update({"append": want})
        self.part_id = want["base"] + self.rank
        self.done_keys = set()
        self._open_part()
        log.info("%s: appending as %s after %d parts", self.path, part_name(self.part_id), want["base"])

    # -- setup
    def _open_root(self) -> dict[str, Any]:
        path = self.path
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path} exists and is not a directory")
        root_attrs = read_root_meta(path)
        if root_attrs is None:
            if path.is_dir():
                junk = [p.name for p in path.iterdir() if not p.name.endswith(".partial") and not is_lock_file(p.name)]
                # Another rank may have created the store meanwhile: its files are not junk.
                if junk and read_root_meta(path) is None:
                    raise StoreError(f"{path} exists and is not an evatok token store (contains {junk[0]!r})")
            path.mkdir(parents=True, exist_ok=True)
            try:
                # Several ranks may create the root at once: identical content, atomic rename.
                zarr.create_group(str(path), attributes={**self.attrs, "layout": self.layout.to_dict()})
            except (ContainsGroupError, ContainsArrayError):
                pass
            root_attrs = read_root_meta(path)
            if root_attrs is None:
                raise StoreError(f"{path}: could not create the store's root group")
        old_user = comparable_attrs(_user_attrs(root_attrs))
        if old_user != comparable_attrs(self.attrs):
            raise StoreError(describe_mismatch(path, old_user, comparable_attrs(self.attrs), "attrs"))
        old = _layout(path, root_attrs)
        finished = "index" in root_attrs  # (an append in progress checks its own world size)
        a, b = old.to_dict(), self.layout.to_dict()
        if finished:
            a.pop("world_size"), b.pop("world_size")
        if a != b:
            if not finished and a["world_size"] != b["world_size"] and {**a, "world_size": 0} == {**b, "world_size": 0}:
                raise StoreError(
                    f"{path} was started with world_size={old.world_size}, this run has "
                    f"{self.layout.world_size}; resume with the same number of processes"
                )
            raise StoreError(describe_mismatch(path, a, b, "layout (blocks, token dtype, extra fields)"))
        return root_attrs

    def _open_part(self) -> None:
        name = part_name(self.part_id)
        pdir = self.path / name
        if not (pdir / "zarr.json").is_file():
            self._create_part(name)
            return
        g = _open(self.path, name, mode="r+")
        committed = g.attrs.get("committed") or {}
        if int(committed.get("samples", 0)) == 0 and not g.attrs.get("complete", False):
            self._create_part(name)  # nothing committed yet: start the part afresh
            return
        self.part = g
        self._n = int(committed["samples"])
        self._ntok = int(committed["tokens"])
        self._part_complete = bool(g.attrs.get("complete", False))
        self._failures = {str(s): str(r) for s, r in g.attrs.get("failures", [])}
        self.failed_sources = set(self._failures)
        self._arrays = self._part_arrays(g)
        # Truncate whatever a killed run wrote after its last commit, and its temporary files.
        for col, arr in self._arrays.items():
            n = self._ntok if col == "tokens" else self._n + 1 if col == "offsets" else self._n
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))
        for tmp in pdir.rglob("*.partial"):
            tmp.unlink(missing_ok=True)
        self.done_keys = set(self._arrays["key"][: self._n].tolist())
        self._seen = set(self.done_keys)
        if len(self.done_keys) != self._n:
            raise StoreError(f"{pdir} holds duplicate keys; the part is corrupted")
        log.info("%s: resuming %s after %d committed samples", self.path, name, self._n)

    def _part_arrays(self, g) -> dict[str, Any]:
        arrays = {}
        try:
            for col in _COLUMNS:
                arrays[col] = g[col]
            for name in self.layout.extra_fields:
                arrays[f"extra/{name}"] = g[f"extra/{name}"]
        except KeyError as e:
            raise StoreError(f"{self.path / g.basename} is missing array {e}; the part is corrupted") from None
        for col in _OPTIONAL:
            if col not in g:  # a part started by an older version, resumed now: fill in "" (unknown)
                n = int((g.attrs.get("committed") or {}).get("samples", 0))
                a = g.create_array(
                    col, shape=(n,), dtype=str, chunks=(STR_CHUNK,), compressors=ZstdCodec(level=3), fill_value=None
                )
                if n:
                    a[:] = np.array([""] * n, dtype=object)
            arrays[col] = g[col]
        return arrays

    def _create_part(self, name: str) -> None:
        root = _open(self.path, "", mode="r+")
        T = self.layout.num_blocks
        g = root.create_group(
            name,
            overwrite=True,
            attributes={
                "rank": self.rank,
                "part": self.part_id,
                "committed": {"samples": 0, "tokens": 0},
                "complete": False,
                "failures": [],
            },
        )
        zstd = ZstdCodec(level=3)

        def arr(name, shape, dtype, chunks, shards=None, group=g):
            return group.create_array(
                name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, compressors=zstd, fill_value=None
            )

        arr("tokens", (0,), self.dtype, (TOKEN_CHUNK,), (TOKEN_SHARD,))
        off = arr("offsets", (1,), np.int64, (ROW_CHUNK,))
        off[:] = 0
        arr("block_lengths", (0, T), np.uint16, (ROW_CHUNK, T))
        arr("assignment", (0,), np.int32, (ROW_CHUNK,))
        arr("label", (0,), np.int32, (ROW_CHUNK,))
        arr("clip_start", (0,), np.int64, (ROW_CHUNK,))
        arr("key", (0,), str, (STR_CHUNK,))
        arr("source", (0,), str, (STR_CHUNK,))
        arr("source_path", (0,), str, (STR_CHUNK,))
        if self.layout.extra_fields:
            eg = g.create_group("extra")
            for fname, (dt, shape) in self.layout.extra_fields.items():
                item = np.dtype(dt).itemsize * int(np.prod(shape))
                arr(fname, (0, *shape), dt, (approx_items(1 << 18, item), *shape), group=eg)
        self.part = g
        self._arrays = self._part_arrays(g)
        self._n = 0
        self._ntok = 0

    # -- appending
    @property
    def committed(self) -> int:
        if self.finished:
            return len(self.done_keys)
        return self._n

    def _add(self, rows: list[Sample]) -> None:
        self._buf.extend(rows)
        while len(self._buf) >= self.commit_every:
            batch, self._buf = self._buf[: self.commit_every], self._buf[self.commit_every :]
            self._commit(batch)
        if not self._buf:
            self._committed_all()

    def _failures_changed(self) -> None:
        self._failures_dirty = True

    def flush(self) -> None:
        if self.finished:
            return
        if self._buf or self._failures_dirty:
            batch, self._buf = self._buf, []
            self._commit(batch)
        self._committed_all()

    def _commit(self, batch: list[Sample]) -> None:
        n0, t0 = self._n, self._ntok
        n1 = n0 + len(batch)
        if batch:
            lengths = np.array([r.tokens.size for r in batch], dtype=np.int64)
            t1 = t0 + int(lengths.sum())
            cols: dict[str, np.ndarray] = {
                "tokens": np.concatenate([r.tokens for r in batch]).astype(self.dtype, copy=False),
                "offsets": t0 + np.cumsum(lengths),
                "block_lengths": np.stack([r.block_lengths for r in batch]).astype(np.uint16),
                "assignment": np.array([r.assignment for r in batch], dtype=np.int32),
                "label": np.array([r.label for r in batch], dtype=np.int32),
                "clip_start": np.array([r.clip_start for r in batch], dtype=np.int64),
                "key": np.array([r.key for r in batch], dtype=object),
                "source": np.array([r.source for r in batch], dtype=object),
                "source_path": np.array([r.source_path for r in batch], dtype=object),
            }
            for name in self.layout.extra_fields:
                cols[f"extra/{name}"] = np.stack([r.extra[name] for r in batch])
            # 1) data beyond the committed end ...
            for col, data in cols.items():
                arr = self._arrays[col]
                lo = t0 if col == "tokens" else n0 + 1 if col == "offsets" else n0
                hi = lo + data.shape[0]
                arr.resize((hi, *arr.shape[1:]))
                if data.shape[0]:
                    arr[lo:hi] = data
        else:
            t1 = t0
        # 2) ... then the committed counts, last.
        self.part.attrs.update(
            {"committed": {"samples": n1, "tokens": t1}, "failures": [list(x) for x in self._failures.items()]}
        )
        self._n, self._ntok = n1, t1
        self._failures_dirty = False

    # -- completion
    def _complete_part(self) -> None:
        self.part.attrs.update({"complete": True})

    def _all_parts_complete(self) -> bool:
        meta = read_root_meta(self.path) or {}
        return all(_part_complete(self.path, name) for name in _pending_parts(meta))

    def _finalize(self) -> None:
        finalize_zarr(self.path)

    def _is_finalized(self) -> bool:
        meta = read_root_meta(self.path)
        return meta is not None and "index" in meta and _appending(meta) is None


def _part_complete(path: Path, name: str) -> bool:
    meta = path / name / "zarr.json"
    try:
        return bool(json.loads(meta.read_text())["attributes"].get("complete", False))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def finalize_zarr(path: Path) -> None:
    """Write the root index once every part is complete (idempotent)."""
    root_attrs = read_root_meta(path)
    if root_attrs is None:
        raise StoreError(f"{path} is not an evatok zarr token store")
    if "index" in root_attrs and _appending(root_attrs) is None:
        return
    _layout(path, root_attrs)
    pending = _pending_parts(root_attrs)
    complete = [name for name in pending if _part_complete(path, name)]
    if len(complete) != len(pending):
        raise StoreError(unfinished_message(path, len(complete), len(pending)))
    old = root_attrs.get("index") or {"parts": [], "failures": []}
    parts, failures, owner = [], [[str(s), str(x)] for s, x in old["failures"]], {}
    for name in [p["name"] for p in old["parts"]] + pending:
        g = _open(path, name)
        c = g.attrs["committed"]
        n, ntok = int(c["samples"]), int(c["tokens"])
        for k in g["key"][:n].tolist():
            if k in owner:
                raise StoreError(f"{path}: sample key {k!r} is in {owner[k]} and {name}; parts overlap")
            owner[k] = name
        parts.append({"name": name, "samples": n, "tokens": ntok})
        if name in pending:
            failures += [[str(s), str(x)] for s, x in g.attrs.get("failures", [])]
    index = {
        "parts": parts,
        "samples": sum(p["samples"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "failures": failures,
    }
    # one write: the new index and the end of the append (a reader sees the old or the new store)
    _open(path, "", mode="r+").attrs.update({"index": index, "append": None})
    log.info("%s: finished, %d samples in %d parts", path, index["samples"], len(parts))


# ---------------------------------------------------------------------------------------- reader
class ZarrReader(StoreReader):
    """Reads a finished zarr store through its root index (or committed parts when asked).

    Random access (``reader[i]``) goes through an LRU cache of decoded chunks (``cache_bytes``,
    default 64 MiB per reader, i.e. per DataLoader worker); iteration reads 1024-sample windows.
    """

    format = "zarr"

    def __init__(self, path: str | Path, allow_unfinished: bool = False, cache_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self.allow_unfinished = allow_unfinished
        self.cache_bytes = int(cache_bytes)
        root_attrs = read_root_meta(self.path)
        if root_attrs is None:
            raise StoreError(f"{self.path} is not an evatok zarr token store")
        self.layout = _layout(self.path, root_attrs)
        self.attrs = _user_attrs(root_attrs)
        index = root_attrs.get("index")
        if index is None or (allow_unfinished and _appending(root_attrs) is not None):
            pending = _pending_parts(root_attrs)
            if not allow_unfinished:
                done = sum(_part_complete(self.path, name) for name in pending)
                raise StoreError(unfinished_message(self.path, done, len(pending)))
            parts = [] if index is None else [dict(p) for p in index["parts"]]
            for name in pending:
                if (self.path / name / "zarr.json").is_file():
                    c = _open(self.path, name).attrs.get("committed") or {"samples": 0, "tokens": 0}
                    if int(c["samples"]) > 0:  # a part killed while being created may lack arrays
                        parts.append({"name": name, "samples": int(c["samples"]), "tokens": int(c["tokens"])})
            self.failures = [] if index is None else [(str(s), str(r)) for s, r in index.get("failures", [])]
            index = None
        else:
            try:
                parts = [
                    {"name": str(p["name"]), "samples": int(p["samples"]), "tokens": int(p["tokens"])}
                    for p in index["parts"]
                ]
                self.failures = [(str(s), str(r)) for s, r in index.get("failures", [])]
            except (KeyError, TypeError, ValueError) as e:
                raise StoreError(f"{self.path} has a corrupted index ({e!r})") from None
        self._parts = parts
        self._load_columns(index is None)

    def _load_columns(self, unfinished: bool) -> None:
        keys, src, cs, asg, bl, lab, self._offsets, self._tok, self._extra = [], [], [], [], [], [], [], [], []
        src_path: list[str] = []
        failures = []
        for p in self._parts:
            g = _open(self.path, p["name"])
            n = p["samples"]
            try:
                off = g["offsets"][: n + 1]
                if off.shape[0] != n + 1 or int(off[-1]) != p["tokens"]:
                    raise StoreError(f"{self.path}/{p['name']} does not match the index (offsets)")
                self._offsets.append(off.astype(np.int64))
                self._tok.append(g["tokens"])
                self._extra.append({f: g[f"extra/{f}"] for f in self.layout.extra_fields})
                keys += g["key"][:n].tolist()
                src += g["source"][:n].tolist()
                src_path += g["source_path"][:n].tolist() if "source_path" in g else [""] * n
                cs.append(g["clip_start"][:n])
                asg.append(g["assignment"][:n])
                bl.append(g["block_lengths"][:n])
                lab.append(g["label"][:n])
            except KeyError as e:
                raise StoreError(f"{self.path}/{p['name']} is missing array {e}; the store is corrupted") from None
            if unfinished:
                failures += [(str(s), str(r)) for s, r in g.attrs.get("failures", [])]
        if unfinished:
            self.failures = failures
        T = self.layout.num_blocks
        self.keys = [str(k) for k in keys]
        self._source = [str(s) for s in src]
        self._source_path = [str(s) for s in src_path]
        self._clip_start = np.concatenate(cs) if cs else np.zeros(0, np.int64)
        self._assignment = np.concatenate(asg).astype(np.int32) if asg else np.zeros(0, np.int32)
        self._block_lengths = np.concatenate(bl) if bl else np.zeros((0, T), np.uint16)
        self._label = np.concatenate(lab).astype(np.int32) if lab else np.zeros(0, np.int32)
        self._starts = np.cumsum([0] + [p["samples"] for p in self._parts])
        self._cache: OrderedDict[tuple[int, str, int], np.ndarray] = OrderedDict()
        self._cache_used = 0

    # -- pickling (DataLoader workers reopen the store instead of sharing zarr handles)
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "allow_unfinished": self.allow_unfinished, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["allow_unfinished"], state["cache_bytes"])

    # -- reading
    def _locate(self, i: int) -> tuple[int, int]:
        p = int(np.searchsorted(self._starts, i, side="right")) - 1
        return p, i - int(self._starts[p])

    def _read_cached(self, p: int, name: str, arr, lo: int, hi: int, size: int) -> np.ndarray:
        """arr[lo:hi] through an LRU cache of whole chunks (random access reads each chunk once)."""
        c = arr.chunks[0]
        pieces = []
        for k in range(lo // c, max(lo, hi - 1) // c + 1):
            key = (p, name, k)
            chunk = self._cache.get(key)
            if chunk is None:
                chunk = arr[k * c : min(size, (k + 1) * c)]
                self._cache[key] = chunk
                self._cache_used += chunk.nbytes
                while self._cache_used > self.cache_bytes and len(self._cache) > 1:
                    self._cache_used -= self._cache.popitem(last=False)[1].nbytes
            else:
                self._cache.move_to_end(key)
            pieces.append(chunk[max(lo - k * c, 0) : max(min(hi - k * c, c), 0)])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _row(self, i: int, tokens: np.ndarray, extra: dict[str, np.ndarray]) -> Sample:
        return Sample(
            key=self.keys[i],
            tokens=tokens,
            block_lengths=self._block_lengths[i],
            assignment=int(self._assignment[i]),
            source=self._source[i],
            clip_start=int(self._clip_start[i]),
            label=int(self._label[i]),
            extra=extra,
            source_path=self._source_path[i],
        )

    def _get(self, i: int) -> Sample:
        p, j = self._locate(i)
        off = self._offsets[p]
        n, ntok = self._parts[p]["samples"], self._parts[p]["tokens"]
        tokens = self._read_cached(p, "tokens", self._tok[p], int(off[j]), int(off[j + 1]), ntok).copy()
        extra = {f: self._extra_value(self._read_cached(p, f, a, j, j + 1, n)[0]) for f, a in self._extra[p].items()}
        return self._row(i, tokens, extra)

    @staticmethod
    def _extra_value(v: np.ndarray) -> np.ndarray:
        return np.array(v, copy=True)

    def iter_range(self, start: int, stop: int) -> Iterator[Sample]:
        start, stop = max(0, int(start)), min(len(self), int(stop))
        for a, b in window_ranges(start, stop, self._starts[:-1], READ_WINDOW):
            p, j0 = self._locate(a)
            j1 = j0 + (b - a)
            off = self._offsets[p]
            t0 = int(off[j0])
            tokens = self._tok[p][t0 : int(off[j1])]
            extras = {f: arr[j0:j1] for f, arr in self._extra[p].items()}
            for k in range(b - a):
                j = j0 + k
                yield self._row(
                    a + k,
                    tokens[int(off[j]) - t0 : int(off[j + 1]) - t0],
                    {f: self._extra_value(v[k]) for f, v in extras.items()},
                )

    def units(self) -> list[tuple[int, int]]:
        return list(window_ranges(0, len(self), self._starts[:-1], UNIT))
