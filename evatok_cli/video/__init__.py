"""Video I/O: PyAV decoding, fps resampling, clip selection, resize/crop, MP4 writing, input sources.

Everything here works on uint8 RGB (F, H, W, 3) arrays (DESIGN §3). Every failure to read a video
is a :class:`VideoError` (``str(e) == f"{path}: {reason}"``). The torch datasets live in
:mod:`evatok_cli.video.dataset` and are imported lazily, so ``import evatok_cli.video`` does not
import torch.

Example:
    >>> from evatok_cli.video import ClipSpec, list_inputs, read_clips
    >>> for ref in list_inputs(["data/ucf101"]):
    ...     clips = read_clips(ref, ClipSpec(frames=16, height=128, width=128), policy="all")
"""

from __future__ import annotations

from evatok_cli.video.clips import (
    Clip,
    ClipPolicy,
    ClipReader,
    ClipSpec,
    clip_starts,
    iter_clips,
    parse_clip_policy,
    plan_starts,
    read_clips,
    resampled_length,
    source_indices,
)
from evatok_cli.video.errors import VideoError
from evatok_cli.video.probe import VideoInfo, VideoSource, probe
from evatok_cli.video.sources import (
    VIDEO_EXTENSIONS,
    VideoRef,
    absolute_source,
    clip_key,
    list_inputs,
    ref_from_source,
    source_name,
    tar_refs,
)
from evatok_cli.video.write import encode_mp4, safe_name, write_mp4

_DATASET_NAMES = (
    "ClipIndexDataset",
    "collate_clips",
    "to_model_input",
    "to_uint8",
    "worker_contiguous_order",
)

__all__ = [
    "VIDEO_EXTENSIONS",
    "Clip",
    "ClipPolicy",
    "ClipReader",
    "ClipSpec",
    "VideoError",
    "VideoInfo",
    "VideoRef",
    "VideoSource",
    "absolute_source",
    "clip_key",
    "source_name",
    "clip_starts",
    "encode_mp4",
    "iter_clips",
    "list_inputs",
    "parse_clip_policy",
    "plan_starts",
    "probe",
    "read_clips",
    "ref_from_source",
    "resampled_length",
    "source_indices",
    "tar_refs",
    "safe_name",
    "write_mp4",
    *_DATASET_NAMES,
]


def __getattr__(name: str):
    if name in _DATASET_NAMES:
        from evatok_cli.video import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'evatok_cli.video' has no attribute {name!r}")
