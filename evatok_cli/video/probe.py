"""Open a video source with PyAV and describe its first video stream (:func:`probe`).

A source is a :class:`~evatok_cli.video.sources.VideoRef`, a path (``TAR::MEMBER`` strings work
too) or the bytes of a file. The frame count is the one the container states (MP4, AVI); when it
states none (Matroska/WebM, MPEG-TS) the packets of the stream are counted by demuxing, which reads
the file but decodes nothing.
"""

from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, Union

import av

from evatok_cli.video.errors import VideoError, decode_errors, open_failure
from evatok_cli.video.sources import VideoRef, normalize_source, ref_from_source

VideoSource = Union[VideoRef, str, os.PathLike, bytes, bytearray, memoryview]


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe` learns about a video's first video stream.

    Attributes:
        path: the source string (``VideoRef.source``, the path, or ``<bytes>``).
        frames: number of frames.
        fps: average frame rate (frames per second).
        width: frame width in pixels.
        height: frame height in pixels.
        duration: ``frames / fps`` in seconds.
        codec: FFmpeg codec name (``h264``, ``vp9``...).
    """

    path: str
    frames: int
    fps: float
    width: int
    height: int
    duration: float
    codec: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def source_name(source: VideoSource) -> str:
    """The string that names ``source`` in errors, keys and stores."""
    if isinstance(source, VideoRef):
        return source.source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return normalize_source(os.fspath(source))


def _as_ref_or_bytes(source: VideoSource) -> VideoRef | bytes:
    if isinstance(source, VideoRef):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, (str, os.PathLike)):
        return ref_from_source(os.fspath(source))
    raise TypeError(f"expected a VideoRef, a path or bytes, got {type(source).__name__}")


def open_container(source: VideoSource) -> tuple[str, av.container.InputContainer, av.VideoStream]:
    """Open ``source`` and pick its first video stream.

    Returns:
        ``(name, container, stream)``; the caller closes the container.

    Raises:
        VideoError: not found, empty, not a video file, corrupt container, no video stream.
    """
    name = source_name(source)
    src = _as_ref_or_bytes(source)
    head = b""
    if isinstance(src, bytes):
        target: str | io.BytesIO = io.BytesIO(src)
        head = src[:16]
    else:
        name = src.source
        if src.member is None:
            try:
                if os.path.isdir(src.path):
                    raise VideoError(name, "is a directory, not a video file")
                with open(src.path, "rb") as f:
                    head = f.read(16)
            except FileNotFoundError:
                raise VideoError(name, "not found") from None
            except OSError as e:
                raise open_failure(name, e, None) from None
            target = src.path
        else:
            target = src.open()
            head = target.getvalue()[:16]
    if not head:
        raise VideoError(name, "empty file (0 bytes)")
    try:
        container = av.open(target, mode="r", metadata_errors="ignore")
    except Exception as e:  # noqa: BLE001 - every FFmpeg/OS failure becomes a VideoError
        raise open_failure(name, e, head) from None
    if not container.streams.video:
        kinds = [s.type for s in container.streams]
        container.close()
        found = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds))) or "no streams at all"
        raise VideoError(name, f"no video stream (found: {found})")
    return name, container, container.streams.video[0]


def _stream_fps(stream: av.VideoStream) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


def stream_info(name: str, container: av.container.InputContainer, stream: av.VideoStream) -> VideoInfo:
    """Describe an open stream; may demux (count packets) when the container states no frame count.

    After a count the container is positioned at its end: reopen it to decode.
    """
    frames = int(stream.frames or 0)
    if frames <= 0:
        with decode_errors(name, "while counting packets"):
            frames = sum(1 for p in container.demux(stream) if p.size > 0)
    if frames <= 0:
        raise VideoError(name, "no frames: the video stream is empty")
    fps = _stream_fps(stream)
    if fps is None:
        if stream.duration and stream.time_base:
            fps = Fraction(frames) / (stream.duration * stream.time_base)
        else:
            raise VideoError(name, "unknown frame rate (the container states none)")
    cc = stream.codec_context
    width, height = int(cc.width or stream.width or 0), int(cc.height or stream.height or 0)
    if width <= 0 or height <= 0:
        raise VideoError(name, "unknown frame size (the stream states none)")
    return VideoInfo(
        path=name,
        frames=frames,
        fps=float(fps),
        width=width,
        height=height,
        duration=float(frames / fps),
        codec=cc.name,
    )


def probe(source: VideoSource) -> VideoInfo:
    """Frame count, rate, size and codec of the first video stream of ``source``.

    Args:
        source: a :class:`VideoRef`, a path (or ``TAR::MEMBER`` string), or the bytes of a file.

    Returns:
        The :class:`VideoInfo`.

    Raises:
        VideoError: unreadable, not a video, no video stream, no frames.
    """
    name, container, stream = open_container(source)
    try:
        return stream_info(name, container, stream)
    finally:
        container.close()
