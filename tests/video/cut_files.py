"""Video files whose container states more frames than decode, made with PyAV (issue 15 tests)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def faststart_mp4(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "10", "bframes": "0"}
        base = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * i, axis=1), format="rgb24")
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def cut_at_packet(src: Path, dst: Path, k: int) -> Path:
    """A copy of ``src`` cut where packet ``k`` (in file order) starts: packets k.. are gone."""
    with av.open(str(src)) as c:
        pos = sorted(p.pos for p in c.demux(c.streams.video[0]) if p.size > 0)
    dst.write_bytes(src.read_bytes()[: pos[k]])
    return dst
