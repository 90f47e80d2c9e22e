"""The one exception of the video layer, and the translation of PyAV/OS failures into it.

Every failure to read a video surfaces as :class:`VideoError` with the offending source and a
reason a user can act on ("not found", "empty file (0 bytes)", "no video stream", "too short: ...").
PyAV, FFmpeg and OS exceptions never escape the public functions of :mod:`evatok_cli.video`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import av

# Container signatures: (byte offset, magic, name). Used only to word the error of a file that
# FFmpeg refuses to open: a known video container that fails is corrupt or truncated, anything
# else is simply not a video file.
_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (4, b"ftyp", "MP4/MOV"),
    (4, b"moov", "MP4/MOV"),
    (4, b"mdat", "MP4/MOV"),
    (4, b"free", "MP4/MOV"),
    (0, b"\x1a\x45\xdf\xa3", "Matroska/WebM"),
    (8, b"AVI ", "AVI"),
    (0, b"\x00\x00\x01\xba", "MPEG-PS"),
    (0, b"FLV", "FLV"),
    (0, b"OggS", "Ogg"),
)


class VideoError(Exception):
    """A video could not be read.

    Attributes:
        path: the source that failed (a path, ``tar::member``, or ``<bytes>``).
        reason: what went wrong, in words.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason

    def __reduce__(self):  # keep (path, reason) across pickling (DataLoader workers)
        return (type(self), (self.path, self.reason))


def sniff_container(head: bytes) -> str | None:
    """Name of the video container whose signature starts ``head``, or ``None``."""
    for offset, magic, name in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def _ffmpeg_message(e: BaseException) -> str:
    msg = getattr(e, "strerror", None) or str(e)
    return str(msg).strip() or type(e).__name__


def open_failure(source: str, e: BaseException, head: bytes | None) -> VideoError:
    """The :class:`VideoError` for an exception raised while *opening* a container."""
    if isinstance(e, FileNotFoundError):
        return VideoError(source, "not found")
    if isinstance(e, IsADirectoryError):
        return VideoError(source, "is a directory, not a video file")
    if isinstance(e, PermissionError):
        return VideoError(source, "unreadable: permission denied")
    if isinstance(e, av.error.EOFError):
        kind = sniff_container(head or b"")
        return VideoError(
            source,
            f"no frames: the {kind + ' file' if kind else 'file'} ends before any video data (empty or truncated)",
        )
    if isinstance(e, av.error.InvalidDataError):
        kind = sniff_container(head or b"")
        if kind is not None:
            return VideoError(source, f"corrupt or truncated {kind} file (FFmpeg: {_ffmpeg_message(e)})")
        return VideoError(source, "not a video file: unrecognized or invalid container data")
    if isinstance(e, (av.error.FFmpegError, OSError)):
        return VideoError(source, f"unreadable: {_ffmpeg_message(e)}")
    return VideoError(source, f"unreadable: {type(e).__name__}: {e}")


@contextmanager
def decode_errors(source: str, what: str) -> Iterator[None]:
    """Turn FFmpeg/OS errors raised inside the block into ``VideoError`` ("corrupt or undecodable")."""
    try:
        yield
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError, EOFError) as e:
        raise VideoError(source, f"corrupt or undecodable video data {what}: {_ffmpeg_message(e)}") from e
