"""Synthetic videos for the video tests, made with PyAV directly (independent of evatok's writer).

``make_video`` frames carry their own index in their colour (R = 16 + 8 * (i % 28),
G = 16 + 8 * (i // 28)), so tests can read back *which* source frame a decoded frame is.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest


def index_frame(i: int, height: int, width: int) -> np.ndarray:
    """A flat frame whose colour encodes ``i``."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[..., 0] = 16 + 8 * (i % 28)
    frame[..., 1] = 16 + 8 * (i // 28)
    frame[..., 2] = 128
    return frame


def frame_index(frame: np.ndarray) -> int:
    """Inverse of :func:`index_frame` on a decoded (lossy) frame."""
    r, g = frame[..., 0].astype(float).mean(), frame[..., 1].astype(float).mean()
    return int(round((r - 16) / 8)) + 28 * int(round((g - 16) / 8))


def encode(
    path: Path, frames: np.ndarray, fps: float = 25.0, codec: str = "libx264", keyint: int | None = None
) -> Path:
    """Write (F, H, W, 3) uint8 frames with PyAV (container from the suffix)."""
    with av.open(str(path), mode="w") as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv420p"
        opts = {"crf": "12"} if codec == "libx264" else {}
        if keyint is not None:
            s.codec_context.gop_size = keyint
            if codec == "libx264":
                opts["x264-params"] = f"keyint={keyint}:min-keyint={keyint}:scenecut=0"
        s.options = opts
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            vf.pts = i
            c.mux(s.encode(vf))
        c.mux(s.encode(None))
    return path


@pytest.fixture
def make_video(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_video(name, n_frames, fps=25, height=48, width=64, **encode_kw)`` -> path."""

    def make(name: str, n_frames: int, fps: float = 25.0, height: int = 48, width: int = 64, **kw) -> Path:
        frames = np.stack([index_frame(i, height, width) for i in range(n_frames)])
        return encode(tmp_path / name, frames, fps=fps, **kw)

    return make


@pytest.fixture
def read_index() -> Callable[[np.ndarray], int]:
    """The :func:`frame_index` decoder, as a fixture for test modules."""
    return frame_index


@pytest.fixture
def make_gradient(tmp_path: Path) -> Callable[..., Path]:
    """Factory: a 4-frame video with R = horizontal ramp 0..255 and G = vertical ramp 0..255."""

    def make(width: int, height: int) -> Path:
        x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
        y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
        frame = np.stack([x, y, np.full_like(x, 128)], axis=-1).round().astype(np.uint8)
        return encode(tmp_path / f"ramp{width}x{height}.mp4", np.stack([frame] * 4))

    return make
