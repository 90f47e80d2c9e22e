"""Write uint8 (F, H, W, 3) RGB frames as H.264 MP4 (libx264, yuv420p, BT.601 limited range).

yuv420p needs even sizes: an odd height or width is padded to the next even number by repeating
the last row or column, so a 61x97 clip becomes a 62x98 file whose top-left 61x97 pixels are the
clip. Files are written to a hidden temporary name in the target directory and renamed when
complete, so a reader never sees a half-written file. ``+faststart`` puts the index first, so the
file streams (e.g. from a WebDataset tar). :func:`safe_name` makes file stems from sample keys.
"""

from __future__ import annotations

import os
import re
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 1, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return np.ascontiguousarray(frames)


def rgb_to_yuv420p(rgb: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) RGB (even H, W) -> the (H * 3 // 2, W) yuv420p planes, BT.601 limited range.

    Integer arithmetic (BT.601's coefficients in 16-bit fixed point, chroma from the 2x2 mean) so
    the bytes handed to the encoder are the same on every CPU; swscale's SIMD paths for this
    conversion round differently from one instruction set to another, which made the same frames
    encode to different files on different machines.
    """
    h, w = rgb.shape[:2]
    c = rgb.astype(np.int64)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    y = ((16829 * r + 33039 * g + 6416 * b + (1 << 15)) >> 16) + 16
    q = c.reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))  # 4x the 2x2 mean
    r, g, b = q[..., 0], q[..., 1], q[..., 2]
    u = ((-9714 * r - 19070 * g + 28784 * b + (1 << 17)) >> 18) + 128
    v = ((28784 * r - 24103 * g - 4681 * b + (1 << 17)) >> 18) + 128
    planes = np.concatenate([y.ravel(), u.ravel(), v.ravel()])
    return np.clip(planes, 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def _encode(
    container: av.container.OutputContainer, frames: np.ndarray, fps: float | Fraction, crf: int, preset: str
) -> None:
    rate = Fraction(fps).limit_denominator(1001) if not isinstance(fps, Fraction) else fps
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    stream = container.add_stream("libx264", rate=rate)
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf), "preset": preset}
    cc = stream.codec_context
    cc.colorspace = 6  # SMPTE170M (BT.601): what swscale uses by default when reading back
    cc.color_range = 1  # limited (MPEG) range
    for i, rgb in enumerate(frames):
        yuv = av.VideoFrame.from_ndarray(rgb_to_yuv420p(rgb), format="yuv420p")
        yuv.pts = i
        container.mux(stream.encode(yuv))
    container.mux(stream.encode(None))


def encode_mp4(frames: np.ndarray, fps: float | Fraction = 25.0, *, crf: int = 18, preset: str = "medium") -> bytes:
    """Encode frames to the bytes of an MP4 file (e.g. for a WebDataset ``KEY.mp4`` member).

    Args:
        frames: uint8 (F, H, W, 3) RGB.
        fps: frame rate (``30000/1001``-style rates are recovered from floats like 29.97).
        crf: x264 constant rate factor (lower = better; 18 is visually near-lossless).
        preset: x264 speed preset.

    Returns:
        The MP4 file's bytes.
    """
    # +faststart rewrites the file after encoding, which needs a real file rather than BytesIO.
    with tempfile.TemporaryDirectory(prefix="evatok-mp4-") as d:
        return write_mp4(Path(d) / "clip.mp4", frames, fps, crf=crf, preset=preset).read_bytes()


def write_mp4(
    path: str | os.PathLike[str],
    frames: np.ndarray,
    fps: float | Fraction = 25.0,
    *,
    crf: int = 18,
    preset: str = "medium",
) -> Path:
    """Write frames as an H.264 MP4, atomically (temporary name, then rename).

    Args:
        path: the output file; its directory must exist.
        frames: uint8 (F, H, W, 3) RGB; odd sizes are padded to even (module doc).
        fps: frame rate.
        crf: x264 constant rate factor.
        preset: x264 speed preset.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    frames = _check_frames(frames)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix or '.mp4'}")
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            _encode(container, frames, fps, crf, preset)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def safe_name(key: str, taken: set[str]) -> str:
    """A file stem made from a sample key: only [A-Za-z0-9_-], never empty, unique in ``taken``."""
    stem = _UNSAFE.sub("_", key).strip("_")[:150] or "sample"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    taken.add(name)
    return name
