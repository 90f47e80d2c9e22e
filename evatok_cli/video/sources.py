"""Input sources: files, directories, stdin lists and WebDataset tars, as :class:`VideoRef` s.

``list_inputs`` turns what a user typed into an ordered, de-duplicated list of videos:

- a file is taken as given (whatever its extension; a ``.tar`` file is read as a WebDataset shard);
- a directory is walked recursively; files whose extension is in ``extensions`` are kept, ``.tar``
  files are read as shards, names starting with ``.`` (hidden files, ``._x.mp4`` AppleDouble
  forks, our own temporary files) are skipped; the order is sorted by path components;
- ``-`` reads newline-separated inputs from stdin (blank lines ignored), each expanded as above;
- a WebDataset shard (an uncompressed ``.tar``) yields one ref per member whose name ends in one of
  ``extensions``, in tar order. Members are read in place (byte range of the tar), never extracted.

``VideoRef.source`` is the stable string naming a video everywhere downstream (store ``source``
column, sample keys, error messages): the path as listed (``os.path.normpath``-ed, not resolved, so
that keys do not depend on mount points), or ``TAR::MEMBER`` for a tar member.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import sys
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from evatok_cli.video.errors import VideoError

VIDEO_EXTENSIONS: tuple[str, ...] = (
    ".mp4",
    ".avi",
    ".webm",
    ".mkv",
    ".mov",
    ".mpg",
    ".mpeg",
    ".m4v",
    ".ts",
    ".mts",
    ".m2ts",
    ".wmv",
    ".flv",
    ".3gp",
    ".ogv",
    ".vob",
    ".mxf",
)
"""File endings a directory walk keeps by default: the common video containers."""
TAR_SEPARATOR = "::"


@dataclass(frozen=True)
class VideoRef:
    """One video: a file, or a member of a WebDataset tar (read in place, never extracted).

    Attributes:
        path: the file, or the tar holding the member.
        member: the member name inside the tar, or ``None`` for a plain file.
        offset: byte offset of the member's data inside the tar.
        size: the member's size in bytes (``-1`` for plain files).
        label_hint: a class-name hint: the parent directory name (UCF-101 layout), or for a tar
            member its directory inside the tar, else the text of a ``.cls`` member of its sample.
    """

    path: str
    member: str | None = None
    offset: int = 0
    size: int = -1
    label_hint: str = ""

    @property
    def source(self) -> str:
        """Stable name of the video: the path, or ``TAR::MEMBER``."""
        return self.path if self.member is None else f"{self.path}{TAR_SEPARATOR}{self.member}"

    def open(self) -> str | io.BytesIO:
        """What PyAV can open: the path of a plain file, or the member's bytes as ``BytesIO``.

        Raises:
            VideoError: the tar is missing or ends inside the member.
        """
        if self.member is None:
            return self.path
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.size)
        except OSError as e:
            raise VideoError(self.source, f"unreadable tar: {e.strerror or e}") from None
        if len(data) != self.size:
            raise VideoError(self.source, f"tar ends inside the member ({len(data)} of {self.size} bytes)")
        return io.BytesIO(data)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> VideoRef:
        """A ref for a plain file (no existence check); ``label_hint`` is its directory name."""
        p = os.path.normpath(os.fspath(path))
        return cls(path=p, label_hint=Path(p).parent.name)


def _norm_exts(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def _sample_key(member: str) -> str:
    """WebDataset grouping key: directory + basename up to its first dot."""
    d, _, base = member.rpartition("/")
    return f"{d}/{base.split('.', 1)[0]}" if d else base.split(".", 1)[0]


def tar_refs(path: str | os.PathLike[str], extensions: Sequence[str] | None = VIDEO_EXTENSIONS) -> list[VideoRef]:
    """The video members of an uncompressed (WebDataset) tar, in tar order.

    Args:
        path: the ``.tar`` file.
        extensions: member name endings that mark a video; ``None`` keeps every regular member.

    Returns:
        One :class:`VideoRef` per video member.

    Raises:
        VideoError: missing file, compressed or corrupt tar.
    """
    p = os.path.normpath(os.fspath(path))
    exts = None if extensions is None else _norm_exts(extensions)
    videos: list[tarfile.TarInfo] = []
    labels: dict[str, str] = {}
    try:
        # "r:" = uncompressed only: members must be addressable as byte ranges of the file.
        with tarfile.open(p, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                name = m.name.lower()
                if name.endswith(".cls") and m.size <= 256:
                    f = tf.extractfile(m)
                    if f is not None:
                        labels[_sample_key(m.name)] = f.read().decode("utf-8", "replace").strip()
                if exts is None or (name.endswith(exts) and not m.name.rpartition("/")[2].startswith(".")):
                    videos.append(m)
    except FileNotFoundError:
        raise VideoError(p, "not found") from None
    except tarfile.ReadError as e:
        raise VideoError(p, f"not an uncompressed tar archive, or a corrupt one ({e})") from None
    except (OSError, tarfile.TarError) as e:
        raise VideoError(p, f"unreadable tar: {e}") from None
    refs = []
    for m in videos:
        d = m.name.rpartition("/")[0]
        hint = d.rpartition("/")[2] if d else labels.get(_sample_key(m.name), "")
        refs.append(VideoRef(path=p, member=m.name, offset=m.offset_data, size=m.size, label_hint=hint))
    return refs


def normalize_source(source: str) -> str:
    """The ``VideoRef.source`` spelling of a path or ``TAR::MEMBER`` string (``normpath``-ed path)."""
    if TAR_SEPARATOR in source and not os.path.exists(source):
        tar, _, member = source.partition(TAR_SEPARATOR)
        return f"{os.path.normpath(tar)}{TAR_SEPARATOR}{member}"
    return os.path.normpath(source)


def absolute_source(source: str) -> str:
    """``source`` with its file (or tar) made absolute against the current directory (not resolved).

    Stores record it beside ``source`` so that a clip is found again from any working directory
    (``evatok decode --metrics``); keys keep using ``source`` as typed. URLs and other non-paths
    (``scheme://...``) are returned unchanged.
    """
    if "://" in source:
        return source
    if TAR_SEPARATOR in source and not os.path.exists(source):
        tar, _, member = source.partition(TAR_SEPARATOR)
        return f"{os.path.abspath(tar)}{TAR_SEPARATOR}{member}"
    return os.path.abspath(source)


def ref_from_source(source: str) -> VideoRef:
    """Rebuild the :class:`VideoRef` named by a ``VideoRef.source`` string (file or ``TAR::MEMBER``).

    Raises:
        VideoError: the tar or its member does not exist.
    """
    if TAR_SEPARATOR in source and not os.path.exists(source):
        tar, _, member = source.partition(TAR_SEPARATOR)
        if tar.lower().endswith(".tar"):
            for ref in tar_refs(tar, extensions=None):
                if ref.member == member:
                    return ref
            raise VideoError(source, f"no member {member!r} in {tar}")
    return VideoRef.from_path(source)


def _walk(root: str, exts: tuple[str, ...], passed_over: list[str] | None = None) -> list[str]:
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            low = fn.lower()
            if fn.startswith("."):
                continue  # hidden files, AppleDouble forks, our own temporary files
            if low.endswith(exts) or low.endswith(".tar"):
                found.append(os.path.join(dirpath, fn))
            elif passed_over is not None:
                passed_over.append(os.path.join(dirpath, fn))
    return sorted(found, key=lambda s: Path(os.path.relpath(s, root)).parts)


def _expand(item: str, exts: tuple[str, ...], passed_over: list[str] | None = None) -> list[VideoRef]:
    if not os.path.exists(item):
        if TAR_SEPARATOR in item:
            return [ref_from_source(item)]
        raise VideoError(item, "not found")
    if os.path.isdir(item):
        out: list[VideoRef] = []
        skipped: list[str] = []
        for f in _walk(os.path.normpath(item), exts, skipped):
            out.extend(tar_refs(f, exts) if f.lower().endswith(".tar") else [VideoRef.from_path(f)])
        if passed_over is not None:
            passed_over.extend(sorted(skipped, key=lambda s: Path(os.path.relpath(s, item)).parts))
        return out
    if item.lower().endswith(".tar"):
        return tar_refs(item, exts)
    return [VideoRef.from_path(item)]


def list_inputs(
    inputs: Sequence[str | os.PathLike[str]],
    extensions: Sequence[str] = VIDEO_EXTENSIONS,
    stdin: TextIO | None = None,
    passed_over: list[str] | None = None,
) -> list[VideoRef]:
    """Expand files, directories, ``-`` (stdin) and WebDataset tars into an ordered list of videos.

    Args:
        inputs: paths as typed by the user; ``-`` reads one input per line from ``stdin``.
        extensions: file endings kept when walking directories and tar members (case-insensitive).
            Files named explicitly are kept whatever their extension.
        stdin: the stream behind ``-`` (default ``sys.stdin``).
        passed_over: when given, receives the files a directory walk did not take (their extension
            is not in ``extensions``; hidden files are not counted), so callers can say so.

    Returns:
        The videos in input order (directories sorted), each source listed once.

    Raises:
        VideoError: an input does not exist (the reason names it), or a tar is unreadable.
    """
    exts = _norm_exts(extensions)
    refs: list[VideoRef] = []
    seen: set[str] = set()

    def add(item: str) -> None:
        for ref in _expand(item, exts, passed_over):
            if ref.source not in seen:
                seen.add(ref.source)
                refs.append(ref)

    for raw in inputs:
        item = os.fspath(raw)
        if item == "-":
            for line in stdin if stdin is not None else sys.stdin:
                line = line.strip()
                if line:
                    add(line)
        else:
            add(item)
    return refs


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def source_name(source: str) -> str:
    """The file name of a source (the member name for ``TAR::MEMBER``), without its directories."""
    return source.rpartition("::")[2].replace("\\", "/").rpartition("/")[2]


def clip_key(source: str, start: int) -> str:
    """A unique, stable sample key for the clip of ``source`` starting at ``start``.

    Format: ``STEM_HASH_START`` where STEM is the file (or tar member) name without its extension,
    with every character outside ``[A-Za-z0-9_-]`` replaced by ``_`` and cut to 48 characters;
    HASH is the first 12 hex digits of sha1(source) (so equal stems in different directories or
    tars never collide); START is the clip start, zero-padded to 6 digits. Keys hold no dots or
    slashes (WebDataset), and the same source string and start always give the same key.

    Args:
        source: ``VideoRef.source`` (path or ``TAR::MEMBER``).
        start: the clip's first frame index (``Clip.start``).

    Returns:
        The key, e.g. ``v_ApplyEyeMakeup_g01_c01_3f2a9c1b0e47_000016``.
    """
    if start < 0:
        raise ValueError(f"clip start must be >= 0, got {start}")
    name = source.rpartition(TAR_SEPARATOR)[2].replace("\\", "/").rpartition("/")[2]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    stem = _UNSAFE.sub("_", stem).strip("_")[:48] or "clip"
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:12]
    return f"{stem}_{digest}_{int(start):06d}"
