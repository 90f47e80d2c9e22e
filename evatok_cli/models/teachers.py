"""Frozen video teachers of the full training recipe (EVATok §2 "Losses", §5): V-JEPA2 and VideoMAE.

The paper aligns the decoder's intermediate features with a frozen **V-JEPA2-L** and, for the final
tokenizer, adds a semantic discriminator built on a frozen **VideoMAE-B**. Both are loaded here from
a local ``transformers`` model directory that the user gives (``config.json`` + weights, as written
by ``save_pretrained`` or downloaded elsewhere with the Hugging Face tools). Nothing is ever
downloaded: every load is ``local_files_only=True``, and a missing or wrong directory is a one-line
:class:`TeacherError` naming it.

``transformers`` is an optional dependency (``pip install evatok[semantic]``), imported only when a
teacher is loaded.

Input pipeline (what the models were trained on): our clips are (B, 3, F, H, W) in [-1, 1]; a
teacher gets (B, F', 3, S, S) with

- pixels mapped to [0, 1] and normalised with the mean/std of the directory's preprocessor config
  when it has one, else the ImageNet mean/std;
- frames resampled to F' by nearest-index sampling (``linspace(0, F-1, F')``; a short clip repeats
  frames): VideoMAE's fixed position table needs exactly ``config.num_frames``; V-JEPA2 uses RoPE
  and keeps the clip's own frame count (rounded up to a multiple of its tubelet);
- each frame resized (bilinear, antialiased) to the teacher's S x S input. We resize the whole frame
  instead of the processors' resize-then-center-crop so that every teacher patch covers the same
  pixels as the tokenizer patches it is compared with.

A teacher is *not* an ``nn.Module`` attribute of the losses that use it, on purpose: its weights are
frozen, loaded from their own directory, never trained, never saved into a training checkpoint and
never synchronised by DDP. It runs in eval mode with ``requires_grad_(False)``, under
``torch.no_grad`` (or with gradients w.r.t. its *input* only, which the semantic discriminator's
generator term needs) and bf16 autocast on CUDA. The time of its last forward is kept in
``last_time_s`` so that training can report the teachers' cost.
"""

from __future__ import annotations

import abc
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


class TeacherError(ValueError):
    """A teacher directory is missing or invalid, or ``transformers`` is not installed."""


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise TeacherError(
            "the V-JEPA2/VideoMAE teachers need the transformers package: pip install evatok[semantic]"
        ) from e
    return transformers


def sample_frames(num_in: int, num_out: int) -> torch.Tensor:
    """Indices of ``num_out`` frames spread evenly over ``num_in`` (repeats frames when ``num_out > num_in``)."""
    if num_in < 1 or num_out < 1:
        raise ValueError(f"need at least one frame, got {num_in} -> {num_out}")
    return torch.linspace(0, num_in - 1, num_out).round().long()


class VideoTeacher(abc.ABC):
    """A frozen ``transformers`` video encoder plus the input pipeline it expects.

    Call it on (B, 3, F, H, W) clips in [-1, 1]; it returns patch features as (B, t', h', w', D).
    Subclasses (:class:`VJEPA2Teacher`, :class:`VideoMAETeacher`) say how to read the config and
    call the model.
    """

    kind: ClassVar[str]
    title: ClassVar[str]
    model_class: ClassVar[str]  # attribute of the transformers package (an allow-list, never a dotted path)

    def __init__(self, model: torch.nn.Module, path: Path, mean: Sequence[float], std: Sequence[float]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.path = path
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1, 1)
        self.last_time_s = 0.0
        cfg = model.config
        patch = cfg.patch_size
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.tubelet_size = int(cfg.tubelet_size)
        self.hidden_size = int(cfg.hidden_size)
        self.num_layers = int(cfg.num_hidden_layers)

    # ---------------------------------------------------------------- what subclasses define
    @property
    @abc.abstractmethod
    def image_size(self) -> int:
        """Square input size the teacher expects."""

    @abc.abstractmethod
    def num_frames(self, clip_frames: int) -> int:
        """Frames the teacher gets for a clip of ``clip_frames`` frames."""

    @abc.abstractmethod
    def _run(self, pixels: torch.Tensor, hidden_states: bool) -> Any:
        """The wrapped model's forward on preprocessed pixels."""

    # ---------------------------------------------------------------- shared
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: torch.device | str) -> VideoTeacher:
        device = torch.device(device)
        if self.device != device:
            self.model.to(device)
        return self

    def parameters(self):
        return self.model.parameters()

    def grid(self, clip_frames: int) -> tuple[int, int, int]:
        """The teacher's patch grid (t', h', w') for a clip of ``clip_frames`` frames."""
        s = self.image_size // self.patch_size
        return self.num_frames(clip_frames) // self.tubelet_size, s, s

    def preprocess(self, video: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> (B, F', 3, S, S) normalised, as the teacher expects (differentiable)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, F, H, W) video, got shape {tuple(video.shape)}")
        b, _, f, h, w = video.shape
        x = (video.float() + 1.0) / 2.0  # [0, 1]
        x = x[:, :, sample_frames(f, self.num_frames(f)).to(video.device)]  # (B, 3, F', H, W)
        f2, s = x.shape[2], self.image_size
        if (h, w) != (s, s):
            x = x.transpose(1, 2).reshape(b * f2, 3, h, w)
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
            x = x.reshape(b, f2, 3, s, s).transpose(1, 2)  # (B, 3, F', S, S)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.transpose(1, 2).contiguous()  # (B, F', 3, S, S)

    def __call__(
        self, video: torch.Tensor, *, layers: Sequence[int] | None = None, grad: bool = False
    ) -> list[torch.Tensor]:
        """Patch features of a clip.

        Args:
            video: (B, 3, F, H, W) in [-1, 1].
            layers: 1-based encoder layers whose outputs to return; ``None``: the model's output
                features (``last_hidden_state``, final norm included where the model has one).
            grad: keep the graph w.r.t. ``video`` (the weights stay frozen either way).

        Returns:
            One (B, t', h', w', D) float32 tensor per requested layer (a single one for ``None``).
        """
        for layer in layers or ():
            if not 1 <= layer <= self.num_layers:
                raise ValueError(f"{self.title} has layers 1..{self.num_layers}, got {layer}")
        t, hh, ww = self.grid(video.shape[2])
        dev = video.device
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with torch.set_grad_enabled(grad), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            out = self._run(self.preprocess(video), hidden_states=layers is not None)
            feats = [out.last_hidden_state] if layers is None else [out.hidden_states[i] for i in layers]
            feats = [x.float().reshape(x.shape[0], t, hh, ww, x.shape[-1]) for x in feats]  # (B, t', h', w', D)
        if cuda:
            torch.cuda.synchronize(dev)
        self.last_time_s = time.perf_counter() - t0
        return feats

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, layers={self.num_layers}, dim={self.hidden_size})"


class VJEPA2Teacher(VideoTeacher):
    """V-JEPA2 encoder (the paper: ViT-L, ``facebook/vjepa2-vitl-fpc64-256``); RoPE, any frame count."""

    kind = "vjepa2"
    title = "V-JEPA2"
    model_class = "VJEPA2Model"

    @property
    def image_size(self) -> int:
        return int(self.model.config.crop_size)  # RoPE positions assume exactly this size

    def num_frames(self, clip_frames: int) -> int:
        return math.ceil(clip_frames / self.tubelet_size) * self.tubelet_size

    def _run(self, pixels: torch.Tensor, hidden_states: bool) -> Any:
        return self.model(pixel_values_videos=pixels, skip_predictor=True, output_hidden_states=hidden_states)


class VideoMAETeacher(VideoTeacher):
    """VideoMAE encoder (the paper: Base, ``MCG-NJU/videomae-base``); fixed 16-frame position table."""

    kind = "videomae"
    title = "VideoMAE"
    model_class = "VideoMAEModel"

    @property
    def image_size(self) -> int:
        size = self.model.config.image_size
        return int(size if isinstance(size, int) else size[0])

    def num_frames(self, clip_frames: int) -> int:
        return int(self.model.config.num_frames)

    def _run(self, pixels: torch.Tensor, hidden_states: bool) -> Any:
        return self.model(pixel_values=pixels, output_hidden_states=hidden_states)


TEACHERS: dict[str, type[VideoTeacher]] = {"vjepa2": VJEPA2Teacher, "videomae": VideoMAETeacher}


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TeacherError(f"{what}: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise TeacherError(f"{what}: {path} is not a JSON object")
    return data


def _mean_std(path: Path, what: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation of the directory's (video) preprocessor config, else ImageNet's."""
    for name in _PREPROCESSOR_FILES:
        if (path / name).is_file():
            pre = _read_json(path / name, what)
            mean, std = pre.get("image_mean", IMAGENET_MEAN), pre.get("image_std", IMAGENET_STD)
            if len(mean) != 3 or len(std) != 3:
                raise TeacherError(f"{what}: {path / name}: image_mean/image_std must have 3 values")
            return tuple(map(float, mean)), tuple(map(float, std))
    return IMAGENET_MEAN, IMAGENET_STD


def load_teacher(path: str | Path, kind: str, *, device: torch.device | str | None = None) -> VideoTeacher:
    """Load a frozen teacher from a local ``transformers`` model directory (never downloads).

    Args:
        path: directory holding ``config.json`` and the weights (safetensors or a weights-only bin).
        kind: ``vjepa2`` or ``videomae``; the directory's ``model_type`` must match.
        device: where to put it (default: CPU; the losses move it to the video's device).

    Returns:
        The teacher, in eval mode with ``requires_grad_(False)``.

    Raises:
        TeacherError: the directory is missing, not a model of that kind, incomplete, or
            ``transformers`` is not installed.
    """
    if kind not in TEACHERS:
        raise TeacherError(f"unknown teacher kind {kind!r} (known: {', '.join(TEACHERS)})")
    cls = TEACHERS[kind]
    what = f"{cls.title} teacher"
    path = Path(path).expanduser()
    if not path.is_dir():
        raise TeacherError(
            f"{what}: {path} is not a directory (give a local transformers model directory: config.json + weights)"
        )
    if not (path / "config.json").is_file():
        raise TeacherError(f"{what}: {path} has no config.json (not a transformers model directory)")
    model_type = _read_json(path / "config.json", what).get("model_type")
    if model_type != kind:
        raise TeacherError(f"{what}: {path} holds a {model_type!r} model, expected {kind!r}")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise TeacherError(f"{what}: {path} has no weights ({' or '.join(_WEIGHT_FILES[::2])})")
    mean, std = _mean_std(path, what)
    model_cls = getattr(_transformers(), cls.model_class)
    try:
        model, info = model_cls.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TeacherError(f"{what}: cannot load {path}: {first}") from e
    missing = list(info.get("missing_keys", ())) + [k for k, *_ in info.get("mismatched_keys", ())]
    if missing:
        # a teacher with freshly initialised weights would silently teach noise
        raise TeacherError(
            f"{what}: {path} lacks {len(missing)} weights (e.g. {missing[0]}): wrong or partial checkpoint"
        )
    teacher = cls(model, path, mean, std)
    return teacher.to(device) if device is not None else teacher
