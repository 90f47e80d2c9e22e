"""Class-to-video generation: sample adaptive-length token sequences with a GPT and decode them.

``generate_videos`` is what ``evatok generate`` runs (EVATok §4.1, PAPER §6): for every requested
class it samples ``num`` sequences with :func:`evatok_cli.sampling.generate` (classifier-free
guidance, temperature, top-k/top-p, token budget), decodes them with the tokenizer the GPT was
trained on, and writes

- ``OUT/class-<name>_<i>.mp4`` files (``mp4`` format; names made safe for any class name), and/or
- ``OUT/samples.zarr``, a token store of the samples (``store`` format): the tokenizer's attrs,
  label = the class, assignment = the sampled block lengths, key = the mp4 file's stem.

**Video continuation** (frame prediction, PAPER §6 "K600 frame prediction"): with ``prefix``
clips, each clip's first frames (``prefix_frames`` real frames, padded to ``prefix_blocks`` blocks
by repeating the last one) are encoded with the fixed prefix assignment
(:mod:`evatok_cli.prefix`), the GPT is teacher-forced through those blocks and samples the rest;
the decoded video is the whole clip (its first frames reconstruct the prefix). Files are
``prefix-<clip>_<i>.mp4`` (``prefix-<clip>_class-<name>_<i>.mp4`` with ``classes``).

The tokenizer must be the one the GPT's training stores were written with: its weights sha256,
assignment space and codebook size are checked against what the GPT directory records
(:func:`~evatok_cli.sampling.check_tokenizer`; a mismatch raises ``TokenizerMismatchError``).

Randomness comes from one CPU generator seeded with ``seed`` and consumed batch after batch, so
the same seed, classes, ``num`` and ``batch_size`` give the same samples.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evatok_cli.checkpoint import OpenModel, open_model, store_attrs
from evatok_cli.prefix import DEFAULT_PREFIX_BLOCKS, encode_prefix, gpt_prefix, read_condition, resolve_prefix
from evatok_cli.runtime import resolve_device
from evatok_cli.sampling import check_tokenizer, decode_samples, default_cfg_scale, generate
from evatok_cli.store import Sample, open_writer
from evatok_cli.video import ClipSpec, VideoError, safe_name, write_mp4
from evatok_cli.video.dataset import to_model_input, to_uint8

log = logging.getLogger(__name__)

FORMATS = ("mp4", "store", "both")
STORE_NAME = "samples.zarr"
NULL_CLASS = "null"
"""Class name that requests unconditional samples (the null class), unless the GPT has a class of that name."""


class GenerateError(Exception):
    """A problem with the generation job as a whole; one line naming the path or option."""


@dataclass
class GenerateSummary:
    """What a generation run wrote (``--json`` prints it as one object)."""

    out: str
    samples: int = 0
    files: list[str] = field(default_factory=list)
    store: str | None = None
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int = 0
    mean_tokens: float = 0.0
    min_tokens: int = 0
    most_tokens: int = 0
    assignments: dict[str, int] = field(default_factory=dict)  # "k1,...,kT" -> count, most frequent first
    per_sample: list[dict[str, Any]] = field(default_factory=list)  # name, class, class_name, tokens, ...
    prefix: dict[str, Any] | None = None  # continuation: blocks, assignment, frames, sources
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_classes(classes: Sequence[int | str] | None, names: Sequence[str] | None, num_classes: int) -> list[int]:
    """Class ids from ids or names (``names`` is the GPT's label mapping); ``null`` = unconditional.

    ``None`` means every class (or the null class when the GPT has none). A string is looked up as a
    name first, then read as an id.

    Raises:
        GenerateError: an unknown name or an id out of range.
    """
    if classes is None:
        return list(range(num_classes)) if num_classes else [num_classes]
    by_name = {n: i for i, n in enumerate(names or [])}
    ids = []
    for c in classes:
        if isinstance(c, str):
            c = c.strip()
            if c in by_name:
                ids.append(by_name[c])
                continue
            if c == NULL_CLASS:
                ids.append(num_classes)
                continue
            try:
                c = int(c)
            except ValueError:
                known = (
                    f"known: {', '.join(names[:10])}{', ...' if len(names) > 10 else ''}"
                    if names
                    else "this GPT records no class names; give class ids"
                )
                raise GenerateError(f"unknown class {c!r} ({known})") from None
        if not 0 <= int(c) < num_classes:
            raise GenerateError(f"class id {c} out of range: the GPT has {num_classes} classes (0..{num_classes - 1})")
        ids.append(int(c))
    if not ids:
        raise GenerateError("no classes given")
    return ids


def generate_videos(
    gpt: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path,
    classes: Sequence[int | str] | None = None,
    num: int = 1,
    cfg_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    format: str = "mp4",
    batch_size: int = 16,
    device: str = "auto",
    ema: bool = True,
    fps: float | None = None,
    prefix: Sequence[str | Path] | None = None,
    prefix_blocks: int | None = None,
    prefix_frames: int | None = None,
    prefix_assignment: str | Sequence[int] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> GenerateSummary:
    """Sample ``num`` clips per class and write them as mp4 files and/or a token store.

    Args:
        gpt: a GPT model directory (or a training output directory: its latest step).
        out: output directory (created); files are ``class-<name>_<i>.mp4`` and ``samples.zarr``.
        tokenizer: the tokenizer the GPT was trained with (checked by weights sha256, space, codebook).
        classes: class ids or names (``null``: unconditional); default: every class.
        num: samples per class.
        cfg_scale: classifier-free guidance; default :func:`default_cfg_scale` of the GPT's preset.
        temperature, top_k, top_p, max_tokens: see :func:`evatok_cli.sampling.generate`.
        seed: seed of the sampling generator.
        format: ``mp4``, ``store`` or ``both``.
        batch_size: sequences sampled (and decoded) together.
        ema: use the GPT's EMA weights when it has them.
        fps: frame rate of the mp4 files (default: the training clips', 25 when native).
        prefix: clips to continue (video continuation): ``num`` samples per clip (and class). Without
            ``classes`` the samples are unconditional (null class) and ``cfg_scale`` defaults to 1
            (PAPER §6: no CFG for K600).
        prefix_blocks: blocks of the condition (default: what the GPT was trained with, else 2).
        prefix_frames: real condition frames, the rest of the prefix blocks repeat the last one
            (default: every frame of the prefix blocks; the paper: 5 of 8).
        prefix_assignment: ``paper``, ``max`` or ``k1,...,kP`` (default: the GPT's, else ``paper``).
        on_progress: called with (samples done, total) after every batch.

    Returns:
        A :class:`GenerateSummary`.

    Raises:
        GenerateError: bad options, a mismatched tokenizer, or an existing output store.
    """
    t0 = time.perf_counter()
    if format not in FORMATS:
        raise GenerateError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if num < 1 or batch_size < 1:
        raise GenerateError(f"num and batch_size must be >= 1, got {num} and {batch_size}")
    dev = resolve_device(device)
    opened, tokenizer_ = open_model(gpt, "gpt", device=dev, ema=ema), open_model(tokenizer, "tokenizer", device=dev)
    check_tokenizer(opened, tokenizer_)
    model, meta, tok = opened.model, opened.meta, tokenizer_.model
    cfg = model.config
    names = meta.get("class_names")
    continuing = prefix is not None
    if continuing and not prefix:
        raise GenerateError("no prefix clips given")
    ids = (
        resolve_classes(classes, names, cfg.num_classes) if classes is not None or not continuing else [cfg.num_classes]
    )
    default_scale = 1.0 if continuing and classes is None else default_cfg_scale(meta.get("preset"), cfg.num_classes)
    scale = default_scale if cfg_scale is None else float(cfg_scale)
    if scale < 0:
        raise GenerateError(f"cfg scale must be >= 0, got {scale}")

    clip_fps = (meta.get("clip") or {}).get("fps", "native")
    conds: list[Any] = [None]
    prefix_info = None
    if continuing:
        conds, prefix_info = _encode_prefixes(prefix, tok, meta, dev, prefix_blocks, prefix_frames,
                                              prefix_assignment, clip_fps)  # fmt: skip

    out = Path(out)
    store_path = out / STORE_NAME
    if format in ("store", "both") and store_path.exists():
        raise GenerateError(f"{store_path} already exists; choose another -o or remove it")
    out.mkdir(parents=True, exist_ok=True)
    out_fps = fps or (25.0 if clip_fps == "native" else float(clip_fps))
    summary = GenerateSummary(out=str(out), cfg_scale=scale, temperature=temperature, top_k=top_k, top_p=top_p,
                              max_tokens=max_tokens, seed=seed)  # fmt: skip
    writer = None
    if format in ("store", "both"):
        settings = {"ema": ema, "cfg_scale": scale, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                    "max_tokens": max_tokens, "seed": seed, "batch_size": batch_size}  # fmt: skip
        summary.store = str(store_path)
    namer = _Namer(cfg.num_classes, names)
    summary.prefix = prefix_info
    if format in ("store", "both"):
        settings["prefix"] = prefix_info
        writer = _store_writer(store_path, opened, tokenizer_, clip_fps, settings)
    rows = [(j, c) for j in range(len(conds)) for c in ids for _ in range(num)]
    gen = torch.Generator().manual_seed(int(seed))
    try:
        for b in range(0, len(rows), batch_size):
            chunk_rows = rows[b : b + batch_size]
            chunk = [c for _, c in chunk_rows]
            pre = [conds[j] for j, _ in chunk_rows] if continuing else None
            samples = generate(model, torch.tensor(chunk), cfg_scale=scale, temperature=temperature, top_k=top_k,
                               top_p=top_p, max_tokens=max_tokens, generator=gen, prefix=pre)  # fmt: skip
            recs = [namer.record(c, tokens, bl, tok.space, None if pre is None else prefix_info["sources"][j])
                    for (j, c), (tokens, bl) in zip(chunk_rows, samples)]  # fmt: skip
            if format in ("mp4", "both"):
                frames = to_uint8(decode_samples(tok, samples, dev).cpu()).numpy()  # (B, F, H, W, 3)
                summary.files += _write_mp4s(recs, frames, out, out_fps)
            if writer is not None:
                writer.append([_sample(rec, tokens, cfg.num_classes) for rec, (tokens, _) in zip(recs, samples)])
            summary.per_sample += recs
            summary.samples += len(chunk)
            if on_progress is not None:
                on_progress(summary.samples, len(rows))
        if writer is not None:
            writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return _finish(summary, t0)


class _Namer:
    """File stems ``class-<name>_<i>`` (safe, unique) and the per-sample records of the summary."""

    def __init__(self, num_classes: int, names: Sequence[str] | None) -> None:
        self.num_classes, self.names = num_classes, names
        self.taken: set[str] = set()
        self.counters: Counter[tuple[str, int]] = Counter()

    def class_name(self, c: int) -> str:
        if c == self.num_classes:
            return NULL_CLASS
        return str(self.names[c]) if self.names is not None else str(c)

    def record(self, c: int, tokens: torch.Tensor, block_lengths: torch.Tensor, space: Any,
               prefix: str | None = None) -> dict[str, Any]:  # fmt: skip
        stem = f"class-{self.class_name(c)}"
        if prefix is not None:  # continuation of a clip: prefix-<clip>[_class-<name>]_<i>
            clip = "prefix-" + Path(prefix).stem
            stem = clip if c == self.num_classes else f"{clip}_{stem}"
        key = (stem, c)
        stem = safe_name(f"{stem}_{self.counters[key]}", self.taken)
        self.counters[key] += 1
        bl = tuple(int(k) for k in block_lengths.tolist())
        rec = {"name": stem, "class": c, "class_name": self.class_name(c), "tokens": int(tokens.numel()),
               "block_lengths": list(bl), "assignment": space.to_index(bl)}  # fmt: skip
        if prefix is not None:
            rec["prefix"] = str(prefix)
        return rec


def _encode_prefixes(clips: Sequence[str | Path], tok: Any, meta: dict[str, Any], dev: torch.device,
                     blocks: int | None, frames: int | None, assignment: str | Sequence[int] | None,
                     clip_fps: Any) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:  # fmt: skip
    """Each clip's prefix (tokens, block lengths) and the summary's ``prefix`` record."""
    c, space = tok.config, tok.space
    trained = gpt_prefix(meta)
    P = blocks if blocks is not None else (trained[0] if trained else DEFAULT_PREFIX_BLOCKS)
    if not 1 <= P < space.blocks:
        raise GenerateError(f"--prefix-blocks must be in [1, {space.blocks - 1}], got {P}")
    try:
        fixed, mismatch = resolve_prefix(meta, space.levels, P, assignment)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    if mismatch:
        log.warning("%s; continuing anyway", mismatch)
    span = P * c.temporal_patch
    real = span if frames is None else int(frames)
    if not 1 <= real <= span:
        raise GenerateError(f"--prefix-frames must be in [1, {span}] ({P} blocks of {c.temporal_patch} frames)")
    spec = ClipSpec(frames=c.frames, height=c.height, width=c.width, fps=clip_fps)
    conds = []
    for path in clips:
        try:
            video = torch.from_numpy(read_condition(path, spec, real))[None]  # (1, F, H, W, 3)
        except VideoError as e:
            raise GenerateError(f"{path}: {e.reason}") from None
        conds += encode_prefix(tok, to_model_input(video).to(dev), fixed)
    record = {"blocks": P, "assignment": list(fixed), "frames": real, "padded_to": span, "tokens": sum(fixed),
              "sources": [str(p) for p in clips]}  # fmt: skip
    return conds, record


def _write_mp4s(recs: list[dict[str, Any]], frames: np.ndarray, out: Path, fps: float) -> list[str]:
    """One mp4 per record (``file`` is added to it); returns the paths written."""
    root, paths = out.resolve(), []
    for rec, clip in zip(recs, frames):
        path = (out / f"{rec['name']}.mp4").resolve()
        if path.parent != root:  # defence in depth: safe_name already removed separators
            raise GenerateError(f"refusing to write outside {out}: {path}")
        write_mp4(path, clip, fps=fps)
        rec["file"] = str(path)
        paths.append(str(path))
    return paths


def _sample(rec: dict[str, Any], tokens: torch.Tensor, num_classes: int) -> Sample:
    c = rec["class"]
    return Sample(key=rec["name"], tokens=tokens.numpy().astype(np.int64), block_lengths=tuple(rec["block_lengths"]),
                  assignment=rec["assignment"], source=f"generated:{rec['name']}", clip_start=0,
                  label=c if c < num_classes else -1)  # fmt: skip


def _store_writer(path: Path, gpt: OpenModel, tokenizer: OpenModel, clip_fps: Any, settings: dict[str, Any]) -> Any:
    """The samples store: the tokenizer's attrs (DESIGN §4) + ``kind: generate`` and how the samples were drawn."""
    meta = gpt.meta
    extra: dict[str, Any] = {"kind": "generate", "generate": {
        "gpt": str(gpt.dir), "gpt_preset": meta.get("preset"), "gpt_sha256": gpt.sha256, **settings}}  # fmt: skip
    if meta.get("class_names") is not None:
        extra["labels"] = list(meta["class_names"])
    c = tokenizer.model.config
    spec = ClipSpec(frames=c.frames, height=c.height, width=c.width, fps=clip_fps)
    return open_writer(path, attrs=store_attrs(tokenizer, spec, extra), num_blocks=gpt.model.config.blocks)


def _finish(summary: GenerateSummary, t0: float) -> GenerateSummary:
    counts = [r["tokens"] for r in summary.per_sample]
    summary.mean_tokens = float(np.mean(counts))
    summary.min_tokens, summary.most_tokens = int(min(counts)), int(max(counts))
    hist = Counter(",".join(map(str, r["block_lengths"])) for r in summary.per_sample)
    summary.assignments = dict(hist.most_common())
    summary.wall_s = time.perf_counter() - t0
    return summary
