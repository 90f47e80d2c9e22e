"""Tokens back to video: ``evatok decode`` writes one mp4 per sample of a token store.

The tokenizer is the one recorded in the store (its sha256 must match the weights given), so a
store is never decoded with the wrong model by accident. ``side_by_side`` puts the source clip
(read again from ``source_path``, the absolute path recorded at encode time, or else ``source``
as typed, at ``clip_start`` with the store's clip geometry) left of the
reconstruction; ``metrics`` computes PSNR/SSIM of each reconstruction against its source clip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evatok_cli.checkpoint import CheckpointError, TokenizerMismatchError, open_model, resolve_model_dir, weights_sha256
from evatok_cli.demo import demo_model_dir, is_shipped
from evatok_cli.metrics.pixel import psnr_frames, ssim_frames
from evatok_cli.runtime import resolve_device
from evatok_cli.store import Sample, open_store
from evatok_cli.video import ClipReader, ClipSpec, VideoError, ref_from_source, safe_name, write_mp4
from evatok_cli.video.dataset import to_model_input, to_uint8

log = logging.getLogger(__name__)


class DecodeError(Exception):
    """A problem with the decode job as a whole; the message names the path."""


def store_tokenizer(store_path: str | Path) -> Path:
    """The tokenizer that wrote a store, for decoding it without ``--tokenizer``.

    The directory recorded at encode time (``locations.tokenizer``) when it still exists with the
    recorded weights (sha256); else the shipped demo tokenizer, only for stores it wrote.

    Raises:
        TokenizerMismatchError: neither is found (the message says what the store records).
        StoreError: not a store.
    """
    attrs = open_store(store_path).attrs
    want = (attrs.get("tokenizer") or {}).get("sha256")
    recorded = (attrs.get("locations") or {}).get("tokenizer")
    why = "records no tokenizer directory"
    if recorded:
        try:
            got = weights_sha256(resolve_model_dir(recorded))
        except (CheckpointError, OSError, ValueError):
            why = f"was written by the tokenizer at {recorded}, which is gone"
        else:
            if not want or got == want:
                return Path(recorded)
            why = f"was written by the tokenizer at {recorded}, whose weights have changed since"
    if want and is_shipped("tokenizer") and weights_sha256(demo_model_dir("tokenizer")) == want:
        return demo_model_dir("tokenizer")
    raise TokenizerMismatchError(
        f"{store_path} {why} (weights sha256 {str(want)[:12]}, not the shipped demo tokenizer's); "
        "pass the tokenizer that wrote it with --tokenizer DIR"
    )


@dataclass
class DecodeSummary:
    out: str
    written: int = 0
    files: list[str] = field(default_factory=list)
    per_clip: list[dict[str, Any]] = field(default_factory=list)  # key, file, psnr, ssim, tokens
    mean_psnr: float | None = None
    mean_ssim: float | None = None
    source_failures: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _source_clip(source: str, start: int, spec: ClipSpec) -> np.ndarray:
    reader = ClipReader(ref_from_source(source), spec)
    try:
        return reader.read(start).frames
    finally:
        reader.close()


def _find_source_clip(s: Sample, spec: ClipSpec) -> np.ndarray:
    """The source clip of ``s``: from its absolute ``source_path`` (any working directory), else
    from ``source`` as typed (relative to this directory; stores written before source_path)."""
    tried = list(dict.fromkeys(x for x in (s.source_path, s.source) if x))
    first: VideoError | None = None
    for cand in tried:
        try:
            return _source_clip(cand, s.clip_start, spec)
        except VideoError as e:
            first = first or e
    assert first is not None
    also = f" (also tried {tried[1]})" if len(tried) > 1 else ""
    raise VideoError(first.path, first.reason + also)


def decode_store(
    store_path: str | Path,
    out_dir: str | Path,
    *,
    tokenizer: str | Path,
    keys: Sequence[str] | None = None,
    limit: int | None = None,
    side_by_side: bool = False,
    metrics: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    fps: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> DecodeSummary:
    """Decode samples of a token store to ``out_dir/<safe key>.mp4``.

    Args:
        keys: decode only these sample keys (default: all, or the first ``limit``).
        side_by_side: write source | reconstruction next to each other.
        metrics: compute PSNR/SSIM of each reconstruction against its source clip.
        fps: frame rate of the written files (default: the store's clip fps, 25 when native).
    """
    store = open_store(store_path)
    dev = resolve_device(device)
    tok = open_model(tokenizer, "tokenizer", device=dev)
    model, model_dir = tok.model, tok.dir
    recorded = store.attrs.get("tokenizer", {})
    want, got = recorded.get("sha256"), tok.sha256
    if want and want != got:
        raise TokenizerMismatchError(
            f"{model_dir}: not the tokenizer that wrote {store_path} (weights sha256 {got[:12]}, the store's "
            f"{want[:12]}, preset {recorded.get('preset') or '?'})"
        )
    clip = store.attrs["clip"]
    spec = ClipSpec(frames=clip["frames"], height=clip["height"], width=clip["width"], fps=clip["fps"])
    out_fps = fps or (25.0 if clip["fps"] == "native" else float(clip["fps"]))
    if keys:
        missing = [k for k in keys if k not in store]
        if missing:
            raise DecodeError(f"{store_path}: no sample with key {missing[0]!r}")
        rows = [store.get(k) for k in keys]
    else:
        n = len(store) if limit is None else min(limit, len(store))
        rows = [store[i] for i in range(n)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    summary = DecodeSummary(out=str(out))
    taken: set[str] = set()
    psnrs, ssims = [], []
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        tokens = [torch.as_tensor(s.tokens.astype(np.int64)) for s in chunk]
        lengths = torch.as_tensor(np.stack([np.asarray(s.block_lengths, dtype=np.int64) for s in chunk]))
        recon = to_uint8(model.decode([t.to(dev) for t in tokens], lengths.to(dev)).cpu()).numpy()  # (B, F, H, W, 3)
        for s, frames in zip(chunk, recon):
            source = None
            if side_by_side or metrics:
                try:
                    source = _find_source_clip(s, spec)
                except VideoError as e:
                    summary.source_failures.append({"key": s.key, "source": s.source, "reason": e.reason})
            rec: dict[str, Any] = {"key": s.key, "tokens": int(len(s.tokens))}
            if metrics and source is not None:
                x = to_model_input(torch.from_numpy(frames)[None])
                y = to_model_input(torch.from_numpy(source)[None])
                rec["psnr"] = float(psnr_frames(x, y).mean())
                rec["ssim"] = float(ssim_frames(x, y).mean())
                psnrs.append(rec["psnr"])
                ssims.append(rec["ssim"])
            video = np.concatenate([source, frames], axis=2) if side_by_side and source is not None else frames
            path = (out / f"{safe_name(s.key, taken)}.mp4").resolve()
            if path.parent != root:  # defence in depth: safe_name already removed separators
                raise DecodeError(f"refusing to write outside {out}: {path}")
            write_mp4(path, video, fps=out_fps)
            rec["file"] = str(path)
            summary.files.append(str(path))
            summary.per_clip.append(rec)
            summary.written += 1
        if on_progress is not None:
            on_progress(summary.written, len(rows))
    if psnrs:
        summary.mean_psnr = float(np.mean(psnrs))
        summary.mean_ssim = float(np.mean(ssims))
    return summary
