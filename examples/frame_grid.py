"""One PNG of frames from `evatok decode --side-by-side` outputs: rows = clips, columns = frames.

    python examples/frame_grid.py OUT.png DIR_A [DIR_B ...] [--frames 0,7,15] [--label A --label B]

Each DIR is the output folder of ``evatok decode STORE -o DIR --side-by-side`` (mp4s whose left
half is the source clip and right half the reconstruction). The mp4s common to all DIRs (by file
name) become rows; for each DIR the chosen frames are placed side by side, so two tokenizers (or
two assignment policies) can be compared clip by clip. Frames are read with PyAV and upscaled by
nearest neighbour (no smoothing: what you see is the pixels), written with matplotlib.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import av
import numpy as np


def read_frames(path: Path, which: list[int]) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    return [frames[min(i, len(frames) - 1)] for i in which]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--frames", default="0,7,15", help="frame indices (comma-separated)")
    p.add_argument("--label", action="append", default=[], help="one per DIR (default: the folder name)")
    p.add_argument("--scale", type=int, default=3, help="nearest-neighbour upscaling")
    p.add_argument("--rows", type=int, default=6, help="at most this many clips")
    args = p.parse_args(argv)
    from matplotlib.figure import Figure

    which = [int(x) for x in args.frames.split(",")]
    labels = args.label or [d.name for d in args.dirs]
    if len(labels) != len(args.dirs):
        raise SystemExit("give one --label per DIR")
    names = sorted(set.intersection(*({f.name for f in d.glob("*.mp4")} for d in args.dirs)))[: args.rows]
    if not names:
        raise SystemExit(f"no mp4 common to {', '.join(map(str, args.dirs))}")
    rows = []
    for n in names:
        cells = []
        for d in args.dirs:
            cells += read_frames(d / n, which)
        gap = np.full((cells[0].shape[0], 4, 3), 255, np.uint8)
        rows.append(np.concatenate([x for c in cells for x in (c, gap)][:-1], axis=1))
    grid = np.concatenate([x for r in rows for x in (r, np.full((4, r.shape[1], 3), 255, np.uint8))][:-1], axis=0)
    grid = grid.repeat(args.scale, 0).repeat(args.scale, 1)
    h, w = grid.shape[:2]
    fig = Figure(figsize=(w / 100, h / 100 + 0.5), dpi=100)
    ax = fig.add_axes((0, 0, 1, h / (h + 50)))
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    title = "   |   ".join(f"{lab}: source | reconstruction, frames {args.frames}" for lab in labels)
    fig.text(0.5, 1 - 25 / (h + 50), title, ha="center", va="center", fontsize=9)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"{args.out}: {len(names)} clips x {len(args.dirs)} x {len(which)} frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
