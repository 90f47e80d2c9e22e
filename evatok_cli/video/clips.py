"""Cut videos into fixed-size clips: fps resampling, clip selection, resize + center crop.

Pipeline for one video (DESIGN §3: uint8 (F, H, W, 3) at the edges):

1. **Frame rate.** ``ClipSpec.fps="native"`` keeps every decoded frame. A number resamples by
   nearest timestamp on the stream's nominal timeline: source frame ``i`` sits at ``i / native``
   seconds, output frame ``j`` at ``j / target`` and takes source frame
   ``floor(j * native / target + 1/2)``. Lower rates drop frames, higher rates repeat them; a video
   of ``n`` frames has ``ceil((n - 1/2) * target / native)`` resampled frames.
2. **Clip selection** over the resampled frames (``F = ClipSpec.frames``): ``"all"``
   non-overlapping consecutive clips from frame 0 (a tail shorter than F is dropped); ``"first"``
   the clip at 0; an int ``N`` N evenly spaced clips, the first at 0 and the last ending on the last
   frame, never overlapping (so at most ``frames // F``); ``"random"`` one clip at a uniform random
   start. ``Clip.start`` is always an index into the *resampled* sequence (equal to the source frame
   index when fps is native).
3. **Geometry.** Each frame is scaled (FFmpeg swscale, area averaging: antialiased when shrinking)
   so that it covers the target ``height x width`` with its aspect ratio kept (for a square target:
   the shorter side becomes the target), then center-cropped.

Decoding stops at the last frame a clip needs, and jumps ahead with a keyframe seek when the next
clip starts far past the decoder (``seek=True``); frames that no clip uses are never converted.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import math
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal, Union

import av
import numpy as np
from av.video.reformatter import Interpolation, VideoReformatter

from evatok_cli.video.errors import VideoError, decode_errors
from evatok_cli.video.probe import VideoInfo, VideoSource, open_container, stream_info
from evatok_cli.video.sources import clip_key, source_name

log = logging.getLogger(__name__)

ClipPolicy = Union[Literal["all", "first", "random"], int]
Seed = Union[int, np.random.Generator]

# Seek instead of decoding forward when the next needed frame is at least this many frames ahead.
SEEK_MIN_GAP = 48


@dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """Geometry of the clips fed to the tokenizer (lives in the tokenizer config, DESIGN §3).

    Args:
        frames: frames per clip (F).
        height: clip height in pixels (H).
        width: clip width in pixels (W).
        fps: ``"native"`` to keep the source rate, or a target rate (a number or a numeric string,
            stored as float) to resample to by nearest timestamp.
    """

    frames: int = 16
    height: int = 128
    width: int = 128
    fps: str | float = "native"

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"ClipSpec.{name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        fps = self.fps
        if isinstance(fps, str) and fps.strip().lower() == "native":
            object.__setattr__(self, "fps", "native")
            return
        try:
            value = float(fps)
        except (TypeError, ValueError):
            raise ValueError(f"ClipSpec.fps must be 'native' or a positive number, got {fps!r}") from None
        if isinstance(fps, bool) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"ClipSpec.fps must be 'native' or a positive number, got {fps!r}")
        object.__setattr__(self, "fps", value)

    @property
    def target_fps(self) -> float | None:
        """The resampling rate, or ``None`` for native."""
        return None if self.fps == "native" else float(self.fps)

    def to_dict(self) -> dict[str, int | float | str]:
        """The fields as a JSON-ready dict (store attrs ``clip{frames,height,width,fps}``)."""
        return {"frames": self.frames, "height": self.height, "width": self.width, "fps": self.fps}


@dataclass
class Clip:
    """One clip cut from a video.

    Attributes:
        frames: uint8 array (F, H, W, 3), RGB.
        start: index of the clip's first frame in the resampled frame sequence (the source frame
            index when ``ClipSpec.fps`` is native).
        source: the video's source string (``VideoRef.source``).
    """

    frames: np.ndarray
    start: int
    source: str

    @property
    def key(self) -> str:
        """The sample key (:func:`~evatok_cli.video.sources.clip_key`)."""
        return clip_key(self.source, self.start)


# Area scaling with swscale's bit-exact C paths: the same pixels on every CPU (its SIMD paths may
# round differently from one instruction set to another), one thread (slices never change results).
EXACT_AREA = Interpolation.AREA | Interpolation.BITEXACT | Interpolation.ACCURATE_RND


def parse_clip_policy(text: str | int) -> ClipPolicy:
    """Parse ``"all"``, ``"first"``, ``"random"`` or a positive integer ``"N"``.

    Raises:
        ValueError: anything else.
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        s = str(text).strip().lower()
        if s in ("all", "first", "random"):
            return s  # type: ignore[return-value]
        try:
            value = int(s)
        except ValueError:
            raise ValueError(f"clip policy must be 'all', 'first', 'random' or a positive int, got {text!r}") from None
    if value < 1:
        raise ValueError(f"clip policy N must be >= 1, got {value}")
    return value


def _ratio(native: float, target: float | None) -> Fraction:
    """native / target as an exact fraction (1 for native); rates like 30000/1001 come out exact."""
    if target is None:
        return Fraction(1)
    return Fraction(native).limit_denominator(1_000_000) / Fraction(target).limit_denominator(1_000_000)


def resampled_length(n_frames: int, native_fps: float, target_fps: float | None) -> int:
    """Number of frames after resampling ``n_frames`` from ``native_fps`` to ``target_fps``."""
    if n_frames <= 0:
        return 0
    r = _ratio(native_fps, target_fps)
    return math.ceil((Fraction(n_frames) - Fraction(1, 2)) / r)


def source_indices(start: int, count: int, native_fps: float, target_fps: float | None) -> list[int]:
    """Source frame index of resampled frames ``start .. start+count-1`` (nearest timestamp)."""
    r = _ratio(native_fps, target_fps)
    return [math.floor(j * r + Fraction(1, 2)) for j in range(start, start + count)]


def make_rng(seed: Seed, source: str = "") -> np.random.Generator:
    """The generator behind ``"random"``: a given Generator, or one seeded by (seed, source name).

    Mixing the source into an int seed gives different videos independent starts under one seed.
    Only the file's name (or the tar member's) is mixed in, never the directory: the same video
    gets the same clips wherever the dataset (or the virtual environment holding test footage)
    happens to live, so runs reproduce across machines and checkouts.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    digest = int.from_bytes(hashlib.sha1(source_name(source).encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, digest])


def clip_starts(
    n_frames: int, clip_frames: int, policy: ClipPolicy, rng: np.random.Generator | None = None
) -> list[int]:
    """Clip start indices over ``n_frames`` (resampled) frames; empty when no clip fits.

    Args:
        n_frames: frames available.
        clip_frames: frames per clip.
        policy: ``"all"``, ``"first"``, ``"random"`` or an int N (evenly spaced, non-overlapping).
        rng: needed for ``"random"``.
    """
    last = n_frames - clip_frames  # the latest possible start
    if last < 0:
        return []
    if policy == "all":
        return list(range(0, last + 1, clip_frames))
    if policy == "first":
        return [0]
    if policy == "random":
        if rng is None:
            raise ValueError("the 'random' clip policy needs a random generator")
        return [int(rng.integers(0, last + 1))]
    if isinstance(policy, (int, np.integer)) and not isinstance(policy, bool) and policy >= 1:
        n = min(int(policy), n_frames // clip_frames)
        if n == 1:
            return [0]
        # Spacing last/(n-1) >= clip_frames because n <= n_frames // clip_frames: no overlap.
        return [math.floor(Fraction(k * last, n - 1) + Fraction(1, 2)) for k in range(n)]
    raise ValueError(f"unknown clip policy {policy!r}")


def plan_starts(info: VideoInfo, spec: ClipSpec, policy: ClipPolicy, seed: Seed = 0) -> list[int]:
    """Clip starts (resampled frame indices) for a probed video.

    Args:
        info: the video, from :func:`~evatok_cli.video.probe.probe`.
        spec: clip geometry and frame rate.
        policy: ``"all"``, ``"first"``, ``"random"`` or an int N (see module doc).
        seed: for ``"random"``: an int (mixed with ``info.path``) or a numpy Generator.

    Returns:
        The starts, increasing.

    Raises:
        VideoError: the video is shorter than one clip (the reason gives both frame counts).
    """
    n = resampled_length(info.frames, info.fps, spec.target_fps)
    rng = make_rng(seed, info.path) if policy == "random" else None
    starts = clip_starts(n, spec.frames, policy, rng)
    if not starts:
        rate = "" if spec.target_fps is None else f" ({n} after resampling to {spec.target_fps:g} fps)"
        raise VideoError(info.path, f"too short: {info.frames} frames{rate}, a clip needs {spec.frames}")
    return starts


def _cover_geometry(w: int, h: int, out_w: int, out_h: int) -> tuple[int, int, int, int]:
    """Scaled size (sw, sh) covering (out_w, out_h) with the aspect kept, and the crop offset."""
    scale = max(out_w / w, out_h / h)
    sw = max(out_w, round(w * scale))
    sh = max(out_h, round(h * scale))
    return sw, sh, (sw - out_w) // 2, (sh - out_h) // 2


class ClipReader:
    """Reads clips of one video; decodes forward only as far as asked (seeking when far ahead).

    Reading clips in increasing start order decodes the video at most once. Use as a context
    manager, or call :meth:`close`.

    Attributes:
        name: the source string.
        info: the probed :class:`VideoInfo`.
        num_frames: frames after fps resampling (the range of clip starts + clip length); lowered
            to what really decodes once a read finds the stream ending early.
        stated_frames: ``num_frames`` as the container states it.
        decodable: source frames that decode, once known (else None).
        decoded: frames decoded so far (restarts and seeks included): what reading has cost.

    Args:
        source: a VideoRef, a path, or bytes.
        spec: clip geometry.
        threads: FFmpeg decoder threads (0 = automatic; 1 inside DataLoader workers).
        seek: allow keyframe seeks to skip long stretches (``SEEK_MIN_GAP`` frames or more).

    Raises:
        VideoError: the video cannot be opened (see :func:`~evatok_cli.video.probe.probe`).
    """

    def __init__(self, source: VideoSource, spec: ClipSpec, *, threads: int = 0, seek: bool = True) -> None:
        self.spec = spec
        self._source = source
        self._threads = threads
        self._seek_ok = seek
        self._container: av.container.InputContainer | None = None
        name, container, stream = open_container(source)
        try:
            info = stream_info(name, container, stream)
        except BaseException:
            container.close()
            raise
        if not stream.frames:  # frames were counted by demuxing: the container sits at its end
            container.close()
            name, container, stream = open_container(source)
        self.name = name
        self.info: VideoInfo = info
        self.num_frames = resampled_length(info.frames, info.fps, spec.target_fps)
        self.stated_frames = resampled_length(info.frames, info.fps, spec.target_fps)
        self.decodable: int | None = None  # source frames that really decode, once a read ran past the end
        self._end_reason: str | None = None  # why decoding stopped early (None: the stream just ended)
        self._reformatter = VideoReformatter()
        _LIVE_READERS.add(self)
        self.decoded = 0  # frames decoded so far, over restarts and seeks (a cost measure)
        self._attach(container, stream)

    # -- decoder state -------------------------------------------------------------------------
    def _attach(self, container: av.container.InputContainer, stream: av.VideoStream) -> None:
        stream.thread_type = "AUTO"
        stream.codec_context.thread_count = self._threads
        self._container, self._stream = container, stream
        self._frames = container.decode(stream)
        self._next = 0  # source index of the frame the decoder yields next
        self._last: tuple[int, np.ndarray | None] = (-1, None)

    def _restart(self) -> None:
        self.close()
        _, container, stream = open_container(self._source)
        self._attach(container, stream)

    def _frame_index(self, frame: av.VideoFrame) -> int | None:
        """Source index of a frame from its timestamp (used only after a seek)."""
        if frame.pts is None or frame.time_base is None:
            return None
        t = (frame.pts - (self._stream.start_time or 0)) * frame.time_base
        x = float(t) * self.info.fps
        return round(x) if abs(x - round(x)) < 0.25 else None

    def _seek_to(self, index: int) -> None:
        """Position the decoder at or before source frame ``index`` via the preceding keyframe."""
        stream = self._stream
        target = (stream.start_time or 0) + int(
            Fraction(index) / Fraction(self.info.fps).limit_denominator(1_000_000) / stream.time_base
        )
        try:
            self._container.seek(target, stream=stream, backward=True, any_frame=False)  # type: ignore[union-attr]
            frames = self._container.decode(stream)  # type: ignore[union-attr]
            first = next(frames)
        except (av.error.FFmpegError, OSError, StopIteration):
            self._restart()
            return
        pos = self._frame_index(first)
        if pos is None or pos > index:
            # Timestamps that do not map onto frame numbers (variable frame rate, odd edit lists):
            # decode this video sequentially from now on, so that frame numbering stays exact.
            log.debug("%s: inexact seek to frame %d (landed on %s); decoding from the start", self.name, index, pos)
            self._seek_ok = False
            self._restart()
            return
        self._frames = _chain_first(first, frames)
        self._next = pos

    def _decode_to(self, index: int, start: int) -> av.VideoFrame:
        if self._seek_ok and index - self._next >= SEEK_MIN_GAP:
            self._seek_to(index)
        while True:
            try:
                frame = next(self._frames, None)
            except (av.error.FFmpegError, OSError, EOFError) as e:
                msg = getattr(e, "strerror", None) or str(e)
                raise _StreamEnd(self._next, f"decoding failed at frame {self._next} ({msg})") from None
            if frame is None:
                raise _StreamEnd(self._next, None)
            self._next += 1
            self.decoded += 1
            if self._next - 1 == index:
                return frame

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        sw, sh, x0, y0 = _cover_geometry(frame.width, frame.height, self.spec.width, self.spec.height)
        with decode_errors(self.name, "while converting a frame"):
            rgb = self._reformatter.reformat(
                frame, width=sw, height=sh, format="rgb24", interpolation=EXACT_AREA, threads=1
            ).to_ndarray()
        return rgb[y0 : y0 + self.spec.height, x0 : x0 + self.spec.width]

    # -- public ----------------------------------------------------------------------------------
    def starts(self, policy: ClipPolicy, seed: Seed = 0) -> list[int]:
        """Clip starts chosen by ``policy`` (see :func:`plan_starts`)."""
        return plan_starts(self.info, self.spec, policy, seed)

    def read(self, start: int) -> Clip:
        """The clip starting at resampled frame ``start``.

        Containers may state more frames than decode (edit lists, a truncated file). The first read
        that runs past the real end learns the real count (``decodable``); a clip that starts
        before the real end but would end past it is moved back to end on the real last frame
        (``Clip.start`` tells where it starts); a clip that starts past it is lost.

        Raises:
            VideoError: ``start`` out of range; the clip starts past the frames that decode (the
                reason says why: the stream ends early, or decoding fails at frame k); the video
                decodes fewer frames than one clip.
        """
        if not 0 <= start <= self.num_frames - self.spec.frames:
            if self.decodable is None or not 0 <= start <= self.stated_frames - self.spec.frames:
                raise VideoError(
                    self.name, f"clip start {start} out of range: {self.num_frames} frames, clip {self.spec.frames}"
                )
            return self._read_within(start)
        try:
            return self._read(start)
        except _StreamEnd as end:
            self.decodable, self._end_reason = end.frames, end.why
            self.num_frames = resampled_length(end.frames, self.info.fps, self.spec.target_fps)
            return self._read_within(start)

    def _read_within(self, start: int) -> Clip:
        """Read ``start`` knowing that only ``self.decodable`` source frames decode (see :meth:`read`)."""
        F, d, stated = self.spec.frames, self.decodable, self.stated_frames
        if start + F <= self.num_frames:
            return self._read_known(start)
        if self._end_reason is None:
            what = f"truncated or corrupt: the stream ends after {d} frames though the container states {stated}"
        else:
            what = f"truncated or corrupt: {self._end_reason}, of the {stated} frames the container states"
        if self.num_frames < F:
            if self._end_reason is None:
                raise VideoError(
                    self.name, f"too short: {d} frames decode (the container states {stated}), a clip needs {F}"
                )
            raise VideoError(self.name, f"{what}; no whole clip of {F} frames decodes")
        if start < self.num_frames:  # the clip straddles the real end: end it on the last frame
            moved = self.num_frames - F
            log.info("%s: %s; the clip at %d ends on the last frame (starts at %d)", self.name, what, start, moved)
            return self._read_known(moved)
        raise VideoError(self.name, f"{what}; the clip at {start} (frames {start}-{start + F - 1}) is lost")

    def _read_known(self, start: int) -> Clip:
        try:
            return self._read(start)
        except _StreamEnd as end:  # frames that decoded before do not now (should not happen)
            raise VideoError(
                self.name,
                f"truncated or corrupt: {end.why or f'the stream ended after {end.frames} frames'}"
                f" on a second read (the clip at {start})",
            ) from None

    def _read(self, start: int) -> Clip:
        if self._container is None:
            raise ValueError("ClipReader is closed")
        wanted = source_indices(start, self.spec.frames, self.info.fps, self.spec.target_fps)
        if wanted[0] < self._next and wanted[0] != self._last[0]:
            self._restart()  # asked to go back: decode again from the start
        out = np.empty((self.spec.frames, self.spec.height, self.spec.width, 3), dtype=np.uint8)
        for k, idx in enumerate(wanted):
            if idx != self._last[0]:
                frame = self._decode_to(idx, start)
                self._last = (idx, self._convert(frame))
            out[k] = self._last[1]
        return Clip(frames=out, start=start, source=self.name)

    def close(self) -> None:
        """Release the decoder, its threads and the file."""
        container = self._container
        # Dropping the stream (and its codec context) is what joins FFmpeg's decoder threads;
        # closing the container alone leaves them running.
        self._container = self._stream = None  # type: ignore[assignment]
        self._frames = iter(())
        if container is not None:
            container.close()

    def __enter__(self) -> ClipReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


# Fork safety. A forked child (DataLoader worker) inherits every open reader, but not the FFmpeg
# decoder threads behind it: freeing such a codec context in the child waits forever on those
# threads' condition variables. After a fork the child therefore takes the inherited decoders away
# from their readers (which then behave as closed) and leaks one reference to them, so that
# nothing in the child, interpreter shutdown included, ever frees them.
_LIVE_READERS: weakref.WeakSet[ClipReader] = weakref.WeakSet()


def _orphan_inherited_readers() -> None:
    for reader in list(_LIVE_READERS):
        orphan = (reader._container, reader._stream, reader._frames)
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(orphan))  # deliberate leak, see above
        reader._container = reader._stream = None  # type: ignore[assignment]
        reader._frames = iter(())
    _LIVE_READERS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_orphan_inherited_readers)


class _StreamEnd(Exception):
    """The decoder stopped before the frame asked for: ``frames`` decoded; ``why`` None = clean end."""

    def __init__(self, frames: int, why: str | None) -> None:
        super().__init__(frames, why)
        self.frames, self.why = frames, why


def _chain_first(first: av.VideoFrame, rest: Iterator[av.VideoFrame]) -> Iterator[av.VideoFrame]:
    yield first
    yield from rest


def iter_clips(
    source: VideoSource,
    spec: ClipSpec,
    policy: ClipPolicy = "first",
    seed: Seed = 0,
    *,
    threads: int = 0,
) -> Iterator[Clip]:
    """Yield the clips of one video chosen by ``policy``, decoding as it goes.

    Args:
        source: a :class:`VideoRef`, a path (or ``TAR::MEMBER``), or the bytes of a file.
        spec: clip geometry and frame rate.
        policy: ``"all"``, ``"first"``, ``"random"`` or an int N (see module doc).
        seed: for ``"random"``: an int (mixed with the source string) or a numpy Generator.
        threads: FFmpeg decoder threads (0 = automatic).

    Yields:
        :class:`Clip` s in increasing ``start`` order.

    Raises:
        VideoError: unreadable video, too short for one clip, or truncated/corrupt data (raised
            when the first clip that needs the missing frames is reached).
    """
    with ClipReader(source, spec, threads=threads) as reader:
        for start in reader.starts(policy, seed):
            yield reader.read(start)


def read_clips(
    source: VideoSource,
    spec: ClipSpec,
    policy: ClipPolicy = "first",
    seed: Seed = 0,
    *,
    threads: int = 0,
) -> list[Clip]:
    """All clips of one video chosen by ``policy`` (see :func:`iter_clips`).

    Returns:
        The clips, in increasing ``start`` order.

    Raises:
        VideoError: unreadable, too short, truncated or corrupt video.
    """
    return list(iter_clips(source, spec, policy, seed, threads=threads))
