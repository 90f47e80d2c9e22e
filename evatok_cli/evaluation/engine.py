"""What the three evaluation jobs share: metric weights, the clips of a protocol, scoring under
assignment policies, metric setup and report bookkeeping (see :mod:`evatok_cli.evaluation`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from evatok_cli.checkpoint import OpenModel, open_model
from evatok_cli.evaluation.protocols import (
    ClipDataset,
    Protocol,
    collate_clips,
    custom_protocol,
    get_protocol,
    listing_sha256,
    plan_clips,
    select_clips,
)
from evatok_cli.evaluation.report import (
    EvalReport,
)
from evatok_cli.metrics import FVD, LPIPS, psnr_frames, ssim_frames
from evatok_cli.metrics.fvd import file_sha256
from evatok_cli.metrics.lpips import lpips_package_heads
from evatok_cli.models.tokenizer import EVATokTokenizer
from evatok_cli.runtime import DistEnv, all_gather_objects
from evatok_cli.video import clip_key, list_inputs, to_model_input

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


RANDOM_I3D_RESOLUTION = 32  # random:SEED I3D sees 32x32 frames (fast plumbing tests)


CLIP_METRICS = ("psnr", "ssim", "lpips")


METRICS = (*CLIP_METRICS, "fvd")


class EvalError(Exception):
    """A problem with the evaluation job as a whole; one line naming the path or option."""


def parse_random(spec: str | Path | None) -> int | None:
    """The seed of a ``random:SEED`` weights spec, or None for a path."""
    if spec is None or not str(spec).startswith(RANDOM_PREFIX):
        return None
    try:
        return int(str(spec)[len(RANDOM_PREFIX) :])
    except ValueError:
        raise EvalError(f"{spec!r}: expected random:SEED with an integer seed") from None


def _sha(path: str | Path) -> str:
    return file_sha256(path)


def load_fvd(i3d: str | Path, variant: str, *, batch_size: int | None = None):
    """An :class:`~evatok_cli.metrics.FVD` and its record for reports; ``random:SEED`` for tests."""
    seed = parse_random(i3d)
    if seed is not None:
        fvd = FVD.random(seed, resolution=RANDOM_I3D_RESOLUTION, batch_size=batch_size)
        info = {
            "variant": fvd.variant,
            "path": str(i3d),
            "sha256": fvd.weights_sha256,
            "resolution": fvd.resolution,
            "random": True,
        }
        return fvd, info
    fvd = FVD.load(i3d, variant=variant, batch_size=batch_size)
    return fvd, {
        "variant": variant,
        "path": str(i3d),
        "sha256": fvd.weights_sha256,
        "resolution": fvd.resolution,
        "random": False,
    }


def load_lpips(weights: str | Path, heads: str | Path | None = None, net: str = "vgg"):
    """An :class:`~evatok_cli.metrics.LPIPS` and its record for reports; ``random:SEED`` for tests."""
    seed = parse_random(weights)
    if seed is not None:
        m = LPIPS.random(net, seed)
        tag = f"random(seed={seed})"
        return m, {
            "net": net,
            "backbone": str(weights),
            "backbone_sha256": tag,
            "heads": str(weights),
            "heads_sha256": tag,
            "random": True,
        }
    heads_path = heads if heads is not None else lpips_package_heads(net)
    m = LPIPS(net, backbone=weights, heads=heads_path)
    return m, {
        "net": net,
        "backbone": str(weights),
        "backbone_sha256": _sha(weights),
        "heads": str(heads_path),
        "heads_sha256": _sha(heads_path),
        "random": False,
    }


@dataclass
class ClipSelection:
    """The clips one job evaluates (the same on every rank) and this rank's share."""

    refs: list[Any]
    items: list[tuple[int, Any, int]]  # (position in the selection, ref, start), all ranks
    failures: list[dict[str, str]]
    available: int
    deviations: list[str]
    listing_sha256: str
    protocol: Protocol  # as run: a --num-clips override is written into it (num_clips, sampling)

    def mine(self, env: DistEnv) -> list[tuple[int, Any, int]]:
        return self.items[env.rank :: env.world_size]

    def record(self, inputs: Sequence[str | Path], clips: int, failures: list[dict[str, str]]) -> dict[str, Any]:
        """The report's ``data`` entry: the inputs, the videos and clips found, the clips used, the failures."""
        return {
            "inputs": [str(i) for i in inputs],
            "videos": len(self.refs),
            "listing_sha256": self.listing_sha256,
            "clips_available": self.available,
            "clips": clips,
            "failures": self.failures + failures,
        }


def prepare_clips(
    inputs: Sequence[str | Path], protocol: Protocol, num_clips: int | None, env: DistEnv, stdin=None
) -> ClipSelection:
    refs = list_inputs([str(i) for i in inputs], stdin=stdin)
    # every rank must plan the same clips (stdin, for one, reaches rank 0 only under torchrun)
    if len(set(all_gather_objects(listing_sha256(refs), env))) > 1:
        raise EvalError("the ranks see different inputs (under torchrun give files or folders, not '-')")
    if not refs:
        raise EvalError(f"no video inputs found in {', '.join(map(str, inputs))}")
    clips, failures, _ = plan_clips(refs, protocol)
    if not clips:
        first = f" (first failure: {failures[0]['source']}: {failures[0]['reason']})" if failures else ""
        raise EvalError(f"no clip of {protocol.frames} frames in the inputs{first}")
    chosen, why = select_clips(len(clips), protocol, num_clips)
    items = [(j, refs[clips[c][0]], clips[c][1]) for j, c in enumerate(chosen.tolist())]
    if failures:
        f = failures[0]
        why.append(f"{len(failures)} videos could not be used (first: {f['source']}: {f['reason']})")
    ran = protocol if num_clips is None else dataclasses.replace(protocol, num_clips=num_clips, sampling="subset")
    return ClipSelection(refs, items, failures, len(clips), why, listing_sha256(refs), ran)


@dataclass
class Point:
    """One assignment policy scored over the clips (a curve point; recon has exactly one).

    ``assign(video, pred, pos)`` gives (B, T) tokens per block for a batch: ``pred`` is the
    router's (B, m^T) output when a router is loaded (else None), ``pos`` the clips' positions in
    the selection.
    """

    label: str
    kind: str
    params: dict[str, Any]
    assign: Callable[[torch.Tensor, torch.Tensor | None, list[int]], torch.Tensor]


@dataclass
class Scored:
    records: list[list[dict[str, Any]]]  # per point, per clip
    real: Any  # FeatureStats or None
    fake: list[Any]  # per point
    failures: list[dict[str, str]]


def _clip_metrics(names: Sequence[str], recon: torch.Tensor, video: torch.Tensor, lpips) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    if "psnr" in names:
        out["psnr"] = psnr_frames(recon, video).mean(1).tolist()
    if "ssim" in names:
        out["ssim"] = ssim_frames(recon, video).mean(1).tolist()
    if "lpips" in names:
        out["lpips"] = lpips(recon, video, video.shape[2])[:, 0].tolist()
    return out


def score_points(
    model,
    clips: ClipSelection,
    points: Sequence[Point],
    env: DistEnv,
    *,
    metrics: Sequence[str],
    lpips,
    fvd,
    router=None,
    batch_size: int,
    workers: int,
    spec: Any,
) -> Scored:
    """Reconstruct this rank's clips under every point; per-clip metrics and FVD statistics."""
    space = model.space
    loader = DataLoader(
        ClipDataset(clips.mine(env), spec),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_clips,
    )
    records: list[list[dict[str, Any]]] = [[] for _ in points]
    real = fvd.new_stats() if fvd is not None else None
    fake = [fvd.new_stats() for _ in points] if fvd is not None else []
    failures: list[dict[str, str]] = []
    with torch.inference_mode():
        for batch, bad in loader:
            failures += bad
            if batch["video"] is None:
                continue
            video = to_model_input(batch["video"]).to(env.device)
            pred = router.predict(video) if router is not None else None
            if real is not None:
                fvd.update(real, video)
            for p, point in enumerate(points):
                a = point.assign(video, pred, batch["pos"]).to(device=env.device, dtype=torch.long)
                tokens, lengths = model.encode(video, a)
                recon = model.decode(tokens, lengths).float()
                values = _clip_metrics(metrics, recon, video, lpips)
                if fvd is not None:
                    fvd.update(fake[p], recon)
                for j, (pos, src, start) in enumerate(zip(batch["pos"], batch["source"], batch["clip_start"])):
                    bl = [int(k) for k in lengths[j].tolist()]
                    rec = {
                        "pos": int(pos),
                        "key": clip_key(src, start),
                        "source": src,
                        "clip_start": int(start),
                        "assignment": bl,
                        "index": space.to_index(bl),
                        "tokens": int(sum(bl)),
                    }
                    rec.update({k: float(v[j]) for k, v in values.items()})
                    records[p].append(rec)
    return Scored(records, real, fake, failures)


def reduce_scores(scored: Scored, env: DistEnv) -> Scored:
    """All ranks' records (sorted by position) and failures; FVD statistics summed over ranks."""
    parts = all_gather_objects((scored.records, scored.failures), env)
    records = [
        sorted((r for recs, _ in parts for r in recs[p]), key=lambda r: r["pos"]) for p in range(len(scored.records))
    ]
    failures = [f for _, fs in parts for f in fs]
    if scored.real is not None:
        scored.real.all_reduce()
        for s in scored.fake:
            s.all_reduce()
    return Scored(records, scored.real, scored.fake, failures)


def metric_means(records: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for m in metrics:
        vals = [r[m] for r in records if m in r]
        out[m] = float(np.mean(vals)) if vals else None
    return out


def fvd_value(fvd, real, fake, deviations: list[str]) -> dict[str, Any] | None:
    try:
        return fvd.compute(real, fake).to_dict()
    except ValueError as e:  # fewer clips than a covariance needs
        deviations.append(f"FVD not computed: {e}")
        return None


@dataclass
class MetricWeights:
    lpips: Any = None
    fvd: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    deviations: list[str] = field(default_factory=list)
    test_only: bool = False


def resolve_metrics(metrics: Sequence[str] | None, *, i3d, lpips_weights) -> list[str]:
    if metrics is None:
        return [
            "psnr",
            "ssim",
            *(["lpips"] if lpips_weights is not None else []),
            *(["fvd"] if i3d is not None else []),
        ]
    names = [m.strip().lower() for m in metrics if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise EvalError(f"unknown metrics {', '.join(bad) or '(none)'} (choose from {', '.join(METRICS)})")
    if "lpips" in names and lpips_weights is None:
        raise EvalError("metric lpips needs --lpips-weights (the backbone; --lpips-heads for the heads)")
    if "fvd" in names and i3d is None:
        raise EvalError("metric fvd needs --i3d (i3d_torchscript.pt or i3d_pretrained_400.pt)")
    return list(dict.fromkeys(names))


def load_metric_weights(
    metrics: Sequence[str],
    protocol: Protocol,
    env: DistEnv,
    *,
    i3d,
    i3d_variant,
    lpips_weights,
    lpips_heads,
    lpips_net,
    batch_size,
) -> MetricWeights:
    w = MetricWeights(info={"i3d": None, "lpips": None})
    if "lpips" in metrics:
        w.lpips, w.info["lpips"] = load_lpips(lpips_weights, lpips_heads, lpips_net)
        w.lpips = w.lpips.to(env.device)
        if w.info["lpips"]["random"]:
            w.test_only = True
            w.deviations.append("LPIPS: seeded random weights (test only: the values are not LPIPS)")
        elif lpips_net != "vgg":
            w.deviations.append(f"LPIPS net {lpips_net} (the paper reports VGG LPIPS)")
    if "fvd" in metrics:
        variant = i3d_variant or protocol.fvd_variant
        w.fvd, w.info["i3d"] = load_fvd(i3d, variant, batch_size=batch_size)
        w.fvd = w.fvd.to(env.device)
        if w.info["i3d"]["random"]:
            w.test_only = True
            w.deviations.append(
                f"I3D: seeded random weights at {RANDOM_I3D_RESOLUTION}px (test only: the values are not FVD)"
            )
        if w.fvd.variant != protocol.fvd_variant:
            w.deviations.append(f"FVD variant {w.fvd.variant} differs from the protocol's {protocol.fvd_variant}")
    return w


def resolve_protocol(
    name: str | None,
    geometry: tuple[int, int, int],
    command: str,
    *,
    clips: str | None,
    i3d: str | Path | None,
    i3d_variant: str | None,
) -> tuple[Protocol, list[str]]:
    """The protocol to run (a preset, or a custom one at the model's geometry) and its deviations."""
    why: list[str] = []
    fvd_variant = i3d_variant or ("videogpt" if parse_random(i3d) is not None else "styleganv")
    if name is None:
        p = custom_protocol(*geometry, clips_per_video=clips or "first", fvd_variant=fvd_variant)
        why.append("no --protocol: a custom protocol at the model's geometry (not comparable with published numbers)")
        return p, why
    p = get_protocol(name)
    if command not in p.commands:
        raise EvalError(f"protocol {name} is for `evatok eval {' / '.join(p.commands)}`, not `eval {command}`")
    if p.geometry != tuple(geometry):
        raise EvalError(
            f"protocol {name} evaluates {p.frames}x{p.height}x{p.width} clips but the tokenizer takes "
            f"{geometry[0]}x{geometry[1]}x{geometry[2]}"
        )
    if clips is not None and str(clips) != p.clips_per_video:
        why.append(f"--clips {clips} overrides the protocol's clips per video ({p.clips_per_video})")
        p = dataclasses.replace(p, clips_per_video=str(clips))
    if p.test_only:
        why.append(f"protocol {p.name} is for tests and CI only")
    return p, why


def load_tokenizer(path: str | Path, env: DistEnv) -> tuple[OpenModel, EVATokTokenizer, tuple[int, int, int]]:
    tok = open_model(path, "tokenizer", device=env.device)
    c = tok.model.config
    return tok, tok.model, (c.frames, c.height, c.width)


def finish_report(report: EvalReport, env: DistEnv, t0: float) -> EvalReport:
    report.standard = not report.deviations
    report.created_utc = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    report.wall_s = time.perf_counter() - t0
    report.world_size, report.rank = env.world_size, env.rank
    return report


def savings_against(mean_tokens: float | None, uniform: int) -> float | None:
    return None if mean_tokens is None else 1.0 - mean_tokens / uniform


def token_summary(mean_tokens: float | None, space: Any, protocol: Protocol) -> dict[str, Any]:
    """Mean tokens, the saving against the uniform assignment at the largest level, and against the
    protocol's reference count (the paper's 1024) when it names one."""
    uniform = space.levels[-1] * space.blocks
    out = {
        "mean_tokens": mean_tokens,
        "uniform_tokens": uniform,
        "token_savings": savings_against(mean_tokens, uniform),
    }
    if protocol.reference_tokens is not None:
        out["reference_tokens"] = protocol.reference_tokens
        out["savings_vs_reference"] = savings_against(mean_tokens, protocol.reference_tokens)
    return out


def check_batch(batch_size: int, workers: int) -> None:
    if batch_size < 1 or workers < 0:
        raise EvalError(f"need --batch-size >= 1 and --workers >= 0, got {batch_size} and {workers}")
