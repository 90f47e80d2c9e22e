"""Evaluation protocols by name: which clips, how many, at what geometry, with which FVD network.

A number such as "rFVD 9.7 on UCF-101" (PAPER §7, Table 3) only means something under a fixed
protocol: the split, how clips are cut from each video, how many clips or samples, the clip
geometry and frame rate, the I3D variant (two networks give different numbers) and the seed of
every random choice. :class:`Protocol` names all of these; :data:`PROTOCOLS` holds the presets
that reproduce the paper's tables (and the field's conventions where the paper is silent), plus
``tiny`` for tests and CI.

Clip selection, the same for every protocol (:func:`plan_clips`, then :func:`select_clips`):

1. every input video gives its clips by ``clips_per_video`` (``random``: one clip per video whose
   start is drawn from ``seed`` and the video's file name, so it depends neither on where the
   dataset sits nor on the number of ranks; ``first``, ``all`` or ``N`` evenly spaced as in
   ``evatok encode``);
2. ``sampling="every"``: every such clip is evaluated, and ``num_clips`` is the size of the split
   (a check: a different count makes the report non-standard);
   ``sampling="subset"``: a seeded random subset of ``num_clips`` clips is evaluated (StyleGAN-V's
   "2048 random clips").

Protocols are data only (frozen dataclasses); they hold no paths (STYLE rule 15): you give the
videos of the named split on the command line. :class:`ClipDataset` reads the planned clips for a
DataLoader (failures kept apart by :func:`collate_clips`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evatok_cli.config import config_from_dict
from evatok_cli.video import (
    ClipReader,
    ClipSpec,
    VideoError,
    clip_starts,
    parse_clip_policy,
    probe,
    resampled_length,
)

COMMANDS = ("recon", "gen")
TASKS = ("reconstruction", "class-to-video", "frame-prediction", "any")
SAMPLING = ("every", "subset")


@dataclass(frozen=True, kw_only=True)
class Protocol:
    """One evaluation protocol (what a report's numbers were measured under).

    Args:
        name: the preset name (``custom`` when built from a tokenizer's geometry).
        task: ``reconstruction``, ``class-to-video``, ``frame-prediction`` or ``any``.
        commands: the ``evatok eval`` commands that may use it (``recon``, ``gen``).
        dataset, split: which videos the user must pass (text for humans and reports).
        clips_per_video: ``random`` (one seeded random clip), ``first``, ``all`` or a number N.
        sampling: ``every`` (all clips; ``num_clips`` is the split size, checked) or ``subset``
            (a seeded random subset of ``num_clips`` clips).
        num_clips: real clips evaluated (reconstruction) / real clips behind the reference
            statistics (generation); ``None``: every clip the policy gives.
        num_samples: generated samples (generation protocols); ``None`` for reconstruction.
        frames, height, width, fps: clip geometry (frames resized to cover H x W, centre-cropped).
        fvd_variant: ``styleganv`` (``i3d_torchscript.pt``) or ``videogpt`` (``i3d_pretrained_400.pt``).
        seed: seed of the clip starts, the subset and (by default) the sampler.
        cond_frames: conditioning frames (frame prediction); 0 otherwise.
        class_balanced: generated samples cycle over the classes (sample i gets class i mod C).
        reference_tokens: the uniform token count the paper's savings are quoted against (1024 =
            4 blocks x 256: "774 (-24.4%)"); reports add ``savings_vs_reference``. None: no such claim.
        reference: where the protocol comes from.
        notes: the choices made where the sources are silent.
        test_only: never a paper number (the ``tiny`` preset).
    """

    name: str
    task: str
    commands: tuple[str, ...]
    dataset: str
    split: str
    clips_per_video: str = "random"
    sampling: str = "every"
    num_clips: int | None = None
    num_samples: int | None = None
    frames: int = 16
    height: int = 128
    width: int = 128
    fps: str | float = "native"
    fvd_variant: str = "styleganv"
    seed: int = 0
    cond_frames: int = 0
    class_balanced: bool = False
    reference_tokens: int | None = None
    reference: str = ""
    notes: str = ""
    test_only: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "commands", tuple(self.commands))
        if self.task not in TASKS:
            raise ValueError(f"Protocol.task must be one of {', '.join(TASKS)}, got {self.task!r}")
        bad = [c for c in self.commands if c not in COMMANDS]
        if bad or not self.commands:
            raise ValueError(f"Protocol.commands must be a non-empty subset of {COMMANDS}, got {self.commands}")
        if self.sampling not in SAMPLING:
            raise ValueError(f"Protocol.sampling must be one of {', '.join(SAMPLING)}, got {self.sampling!r}")
        if self.sampling == "subset" and self.num_clips is None:
            raise ValueError("Protocol.sampling='subset' needs num_clips")
        for name in ("num_clips", "num_samples"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) < 1):
                raise ValueError(f"Protocol.{name} must be a positive int or None, got {v!r}")
        for name in ("frames", "height", "width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Protocol.{name} must be >= 1")
        if not 0 <= self.cond_frames < self.frames:
            raise ValueError(f"Protocol.cond_frames must be in [0, frames), got {self.cond_frames}")
        if self.fvd_variant not in ("styleganv", "videogpt"):
            raise ValueError(f"Protocol.fvd_variant must be styleganv or videogpt, got {self.fvd_variant!r}")

        parse_clip_policy(self.clips_per_video)
        ClipSpec(frames=self.frames, height=self.height, width=self.width, fps=self.fps)

    @property
    def geometry(self) -> tuple[int, int, int]:
        """(frames, height, width)."""
        return (self.frames, self.height, self.width)

    def clip_spec(self):
        """The :class:`~evatok_cli.video.ClipSpec` clips are read with."""
        return ClipSpec(frames=self.frames, height=self.height, width=self.width, fps=self.fps)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["commands"] = list(self.commands)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Protocol:

        return config_from_dict(cls, d)


_UCF_TRAIN = "UCF-101 train list of split 1 (ucfTrainTestlist/trainlist01.txt: 9,537 videos, 101 classes)"
_UCF_REF = (
    "LARP (Wang et al., 2024) eval/rfvd_evaluator.py and sample.py: ucf101_train.csv, 16 frames, short side "
    "resized to 128 and centre-cropped, native fps, one clip per video at a random start, StyleGAN-V's "
    "i3d_torchscript.pt; EVATok PAPER §7 follows LARP/AdapTok"
)

PROTOCOLS: dict[str, Protocol] = {
    "ucf-rfvd": Protocol(
        name="ucf-rfvd",
        task="reconstruction",
        commands=("recon",),
        dataset="UCF-101",
        split=_UCF_TRAIN,
        clips_per_video="random",
        sampling="every",
        num_clips=9537,
        fvd_variant="styleganv",
        seed=0,
        reference_tokens=1024,
        reference=_UCF_REF,
        notes="One 16-frame clip per training video, its start drawn uniformly (LARP draws it unseeded; evatok "
        "seeds it with `seed` and the video path, so reruns and any number of ranks see the same clips). "
        "rFVD compares the real clips with their reconstructions (both 9,537). PSNR/SSIM/LPIPS are "
        "per-frame means over the same clips.",
    ),
    "ucf-c2v-10k": Protocol(
        name="ucf-c2v-10k",
        task="class-to-video",
        commands=("gen",),
        dataset="UCF-101",
        split=_UCF_TRAIN,
        clips_per_video="random",
        sampling="every",
        num_clips=9537,
        num_samples=10000,
        fvd_variant="styleganv",
        seed=0,
        class_balanced=True,
        reference_tokens=1024,
        reference=_UCF_REF + "; 10,000 samples (PAPER §6)",
        notes="10,000 class-conditional samples, classes balanced: sample i gets class i mod 101 (class 0 gets 100 "
        "samples, every other class 99). Reference "
        "statistics: one random 16-frame clip of every training video. CFG: the GPT preset's default "
        "(PAPER §6: 2.5 for GPT-B, 1.75 larger) unless --cfg is given; the report records it.",
    ),
    "k600-fp-50k": Protocol(
        name="k600-fp-50k",
        task="frame-prediction",
        commands=("gen",),
        dataset="Kinetics-600",
        split="Kinetics-600 validation list (LARP's k600_val.csv)",
        clips_per_video="random",
        sampling="every",
        num_clips=None,
        num_samples=50000,
        fvd_variant="styleganv",
        seed=0,
        cond_frames=5,
        reference_tokens=1024,
        reference="LARP sample.py --fp --num_cond_frames 5 --num_samples 50000; PAPER §6 (5 condition frames "
        "padded to 8, condition length 512+128 tokens, condition frames generated too, no CFG)",
        notes="Sample i continues real clip i mod n (LARP cycles over the validation clips): its first 5 frames, "
        "padded to 8 (2 blocks) by repeating frame 5, are encoded with the fixed prefix assignment (default "
        "`paper`: (512, 128) in the paper's space) and teacher-forced; the GPT samples blocks 3-4 with the null "
        "class and no CFG. The whole decoded 16-frame clip is compared with the real clips. The paper's "
        "condition is a separate 640-token prefix and the condition frames are generated again; evatok's "
        "condition is the clip's own first 2 blocks (docs/generation.md, 'Video continuation').",
    ),
    "tiny-fp": Protocol(
        name="tiny-fp",
        task="frame-prediction",
        commands=("gen",),
        dataset="any",
        split="the videos given",
        clips_per_video="first",
        sampling="every",
        num_clips=None,
        num_samples=4,
        frames=8,
        height=32,
        width=32,
        fvd_variant="videogpt",
        seed=0,
        cond_frames=3,
        test_only=True,
        reference="evatok tests and CI only: k600-fp-50k at the `tiny` tokenizer's geometry",
        notes="8x32x32 clips, 3 condition frames padded to 4 (2 blocks of 2 frames), as 5 to 8 in k600-fp-50k.",
    ),
    "fvd2048-16f": Protocol(
        name="fvd2048-16f",
        task="any",
        commands=("recon", "gen"),
        dataset="any (name it in the report)",
        split="the videos given",
        clips_per_video="random",
        sampling="subset",
        num_clips=2048,
        num_samples=2048,
        fvd_variant="styleganv",
        seed=0,
        class_balanced=True,
        reference="StyleGAN-V (Skorokhodov et al., 2022) fvd2048_16f: 2048 real and 2048 fake clips of 16 "
        "consecutive frames, i3d_torchscript.pt, covariance with ddof=0",
        notes="Real clips: one random clip per video, then a seeded random subset of 2048 clips (StyleGAN-V draws "
        "2048 random clips of random videos; with fewer than 2048 videos evatok evaluates them all and "
        "marks the report non-standard). Geometry 16x128x128 (this project's clips).",
    ),
    "tiny": Protocol(
        name="tiny",
        task="any",
        commands=("recon", "gen"),
        dataset="any",
        split="the videos given",
        clips_per_video="first",
        sampling="every",
        num_clips=None,
        num_samples=4,
        frames=8,
        height=32,
        width=32,
        fvd_variant="videogpt",
        seed=0,
        class_balanced=True,
        test_only=True,
        reference="evatok tests and CI only",
        notes="The `tiny` tokenizer's 8x32x32 clips; never a paper number.",
    ),
}


def get_protocol(name: str) -> Protocol:
    """A preset by name (``ValueError`` naming the known ones otherwise)."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r} (known: {', '.join(PROTOCOLS)})") from None


def custom_protocol(
    frames: int,
    height: int,
    width: int,
    fps: str | float = "native",
    *,
    clips_per_video: str = "first",
    fvd_variant: str = "styleganv",
    seed: int = 0,
) -> Protocol:
    """An ad-hoc protocol at a model's own geometry (no ``--protocol``): every clip, never standard."""
    return Protocol(
        name="custom",
        task="any",
        commands=COMMANDS,
        dataset="the videos given",
        split="the videos given",
        clips_per_video=str(clips_per_video),
        sampling="every",
        num_clips=None,
        frames=frames,
        height=height,
        width=width,
        fps=fps,
        fvd_variant=fvd_variant,
        seed=seed,
        reference="none: no --protocol was given",
        notes="Every clip of the given videos.",
    )


def select_clips(available: int, protocol: Protocol, override: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Which of ``available`` clips (in listing order) a protocol evaluates, and why it deviates.

    Args:
        available: clips the inputs gave under ``protocol.clips_per_video`` (failures excluded).
        protocol: the protocol.
        override: ``--num-clips``: a seeded random subset of this many clips instead (smoke runs).

    Returns:
        ``(indices, deviations)``: sorted int64 positions into the available clips, and one line per
        way the selection departs from the protocol (empty for a standard run).
    """
    why: list[str] = []
    want = protocol.num_clips
    if override is not None:
        if override < 1:
            raise ValueError(f"--num-clips must be >= 1, got {override}")
        was = want if want is not None else "every clip"
        why.append(f"--num-clips {override} overrides the protocol's count ({was})")
        want, subset = override, True
    else:
        subset = protocol.sampling == "subset"
    if want is None or (not subset and available == want):
        return np.arange(available, dtype=np.int64), why
    if not subset:  # "every": the count is the split's size, a check
        why.append(f"the data gave {available} clips; protocol {protocol.name} expects {want} (its split's size)")
        return np.arange(available, dtype=np.int64), why
    if available <= want:
        if available < want:
            why.append(f"only {available} clips available; {want} asked for")
        return np.arange(available, dtype=np.int64), why
    rng = np.random.default_rng([protocol.seed, 0x5E1EC7])
    return np.sort(rng.choice(available, size=want, replace=False)).astype(np.int64), why


# ------------------------------------------------------------------------------------ clips
def _video_name(source: str) -> str:
    """The file name of a source (tar members: the member's), which seeds its random clip start."""
    return source.rpartition("::")[2].replace("\\", "/").rpartition("/")[2]


def plan_clips(
    refs: Sequence[Any], protocol: Protocol
) -> tuple[list[tuple[int, int]], list[dict[str, str]], list[int]]:
    """Every clip the protocol's per-video policy gives, in listing order.

    ``random`` draws one start per video from ``(protocol.seed, sha1(file name))``: the same clip
    whatever the path prefix, the order of the inputs or the number of ranks.

    Returns:
        ``(clips, failures, frames)``: ``(video number, start)`` pairs, ``{source, reason}`` for
        videos that cannot be read or are too short, and each video's frame count (-1 if failed).
    """
    spec, policy = protocol.clip_spec(), parse_clip_policy(protocol.clips_per_video)
    clips: list[tuple[int, int]] = []
    failures: list[dict[str, str]] = []
    frames: list[int] = []
    for i, ref in enumerate(refs):
        try:
            info = probe(ref)
        except VideoError as e:
            failures.append({"source": ref.source, "reason": e.reason})
            frames.append(-1)
            continue
        n = resampled_length(info.frames, info.fps, spec.target_fps)
        frames.append(n)
        rng = None
        if policy == "random":
            digest = int.from_bytes(hashlib.sha1(_video_name(ref.source).encode()).digest()[:8], "little")
            rng = np.random.default_rng([protocol.seed, digest])
        starts = clip_starts(n, spec.frames, policy, rng)
        if not starts:
            failures.append({"source": ref.source, "reason": f"too short: {n} frames, a clip needs {spec.frames}"})
            continue
        clips.extend((i, s) for s in starts)
    return clips, failures, frames


class ClipDataset:
    """Map-style dataset (for a DataLoader) over planned ``(position, ref, start)`` clips.

    Items: ``{pos, source, clip_start, video}`` with ``video`` uint8 (F, H, W, 3), or ``error``
    instead of ``video`` when the clip cannot be decoded (:func:`collate_clips` keeps them apart).
    The last video stays open, so consecutive clips of one video decode it once.
    """

    def __init__(self, items: Sequence[tuple[int, Any, int]], spec: Any) -> None:
        self.items, self.spec = list(items), spec
        self._reader: tuple[int, str, Any] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def __getitem__(self, i: int) -> dict[str, Any]:
        pos, ref, start = self.items[i]
        try:
            pid = os.getpid()
            if self._reader is None or self._reader[:2] != (pid, ref.source):
                if self._reader is not None and self._reader[0] == pid:
                    self._reader[2].close()
                self._reader = (pid, ref.source, ClipReader(ref, self.spec, threads=1))
            frames = self._reader[2].read(start).frames
        except VideoError as e:
            self._reader = None
            return {"pos": pos, "source": ref.source, "clip_start": start, "error": e.reason}

        video = torch.from_numpy(np.ascontiguousarray(frames))
        return {"pos": pos, "source": ref.source, "clip_start": start, "video": video}


def collate_clips(items: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(batch with ``video`` uint8 (B, F, H, W, 3) or None, ``pos``, ``source``, ``clip_start``; failures)."""
    good = [it for it in items if "error" not in it]
    bad = [
        {"source": it["source"], "reason": f"clip at {it['clip_start']}: {it['error']}"}
        for it in items
        if "error" in it
    ]
    return {
        "video": torch.stack([it["video"] for it in good]) if good else None,
        "pos": [it["pos"] for it in good],
        "source": [it["source"] for it in good],
        "clip_start": [int(it["clip_start"]) for it in good],
    }, bad


def listing_sha256(refs: Sequence[Any]) -> str:
    """sha256 of the inputs listing: each video's source string and size in bytes, in order."""
    h = hashlib.sha256()
    for r in refs:
        size = r.size
        if size < 0:
            try:
                size = os.path.getsize(r.path)
            except OSError:
                size = -1
        h.update(f"{r.source}\t{size}\n".encode())
    return h.hexdigest()


def balanced_labels(n: int, num_classes: int) -> list[int]:
    """Class of sample i: ``i mod num_classes`` (counts differ by at most one); without classes id 0, the null class."""
    if num_classes <= 0:
        return [0] * n  # GPTs without classes: id 0 == num_classes == the null class
    return [i % num_classes for i in range(n)]


__all__ = [
    "PROTOCOLS",
    "ClipDataset",
    "Protocol",
    "balanced_labels",
    "collate_clips",
    "custom_protocol",
    "get_protocol",
    "listing_sha256",
    "plan_clips",
    "select_clips",
]
