"""Evaluation people can trust: rFVD / gFVD / PSNR / SSIM / LPIPS under named protocols (PAPER §7).

Three jobs, each returning an :class:`EvalReport` (JSON for machines, markdown for people):

- :func:`evaluate_reconstruction` (``evatok eval recon``): encode and decode the protocol's clips
  with a tokenizer (uniform, fixed or router assignments); per-clip and mean PSNR / SSIM / LPIPS,
  mean tokens and the saving against the uniform assignment at the largest level, and rFVD between
  the real clips and their reconstructions.
- :func:`evaluate_generation` (``evatok eval gen``): gFVD of class-conditional GPT samples against
  the protocol's real clips; the real statistics are cached on disk, keyed by the inputs listing,
  the protocol and the I3D weights.
- :func:`evaluate_curve` (``evatok eval curve``): the quality-cost curve of PAPER Fig. 4: a metric
  against mean tokens for every uniform level and for a router at several w_q (w_l = 2 - w_q) or
  token budgets, with the uniform tokens each router point saves at equal quality.

Every job runs as one process or under ``torchrun``: clips (and generated samples) are split over
ranks, FVD statistics are summed with ``FeatureStats.all_reduce`` and per-clip records gathered, so
the report does not depend on the number of ranks (clip starts and sampler seeds are per clip /
per chunk, never per rank). Rank 0 holds the full report; other ranks return theirs with partial
contents (``rank`` > 0) and should not write it.

Which clips a job reads is the protocol's business (:mod:`evatok_cli.protocols`: presets, clip
planning, subsets); what a job returns is an :class:`~evatok_cli.eval_report.EvalReport`
(:mod:`evatok_cli.eval_report`: JSON, markdown, comparison, plots). A report records the protocol
(and how the run deviated from it), the sha256 of every set of weights involved (tokenizer, router,
GPT, I3D, LPIPS backbone and heads), the evatok version and the seeds.
:func:`~evatok_cli.eval_report.compare_reports` refuses reports made under different protocols or
metric weights. ``random:SEED`` instead of a weights path builds seeded random I3D / LPIPS networks: for
tests only, and such reports say so.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evatok_cli import __version__
from evatok_cli.eval_report import (
    HIGHER_IS_BETTER,
    EvalReport,
    NotComparable,
    comparable,
    compare_reports,
    load_report,
    matplotlib_available,
    plot_curve,
    render_markdown,
    write_report,
)
from evatok_cli.protocols import (
    ClipDataset,
    Protocol,
    balanced_labels,
    collate_clips,
    custom_protocol,
    get_protocol,
    listing_sha256,
    plan_clips,
    select_clips,
)
from evatok_cli.train.dist import DistEnv, all_gather_objects, broadcast_object, init_distributed, shutdown

log = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"
RANDOM_I3D_RESOLUTION = 32  # random:SEED I3D sees 32x32 frames (fast plumbing tests)
CLIP_METRICS = ("psnr", "ssim", "lpips")
METRICS = (*CLIP_METRICS, "fvd")
DEFAULT_W_Q = (0.8, 1.2, 1.6)  # curve: reward-head router points (w_l = 2 - w_q, PAPER §3)


class EvalError(Exception):
    """A problem with the evaluation job as a whole; one line naming the path or option."""


# --------------------------------------------------------------------------- metric weights
def parse_random(spec: str | Path | None) -> int | None:
    """The seed of a ``random:SEED`` weights spec, or None for a path."""
    if spec is None or not str(spec).startswith(RANDOM_PREFIX):
        return None
    try:
        return int(str(spec)[len(RANDOM_PREFIX) :])
    except ValueError:
        raise EvalError(f"{spec!r}: expected random:SEED with an integer seed") from None


def _sha(path: str | Path) -> str:
    from evatok_cli.metrics.fvd import file_sha256

    return file_sha256(path)


def load_fvd(i3d: str | Path, variant: str, *, batch_size: int | None = None):
    """An :class:`~evatok_cli.metrics.FVD` and its record for reports; ``random:SEED`` for tests."""
    from evatok_cli.metrics import FVD

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
    from evatok_cli.metrics import LPIPS
    from evatok_cli.metrics.lpips import lpips_package_heads

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


def _model_record(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    from evatok_cli.checkpoint import read_model_meta, weights_sha256

    return {"path": str(path), "sha256": weights_sha256(path), "preset": read_model_meta(path).get("preset")}


@dataclass
class _Clips:
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


def _prepare_clips(
    inputs: Sequence[str | Path], protocol: Protocol, num_clips: int | None, env: DistEnv, stdin=None
) -> _Clips:
    from evatok_cli.video import list_inputs

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
    return _Clips(refs, items, failures, len(clips), why, listing_sha256(refs), ran)


# ------------------------------------------------------------------------------ the engine
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
class _Scored:
    records: list[list[dict[str, Any]]]  # per point, per clip
    real: Any  # FeatureStats or None
    fake: list[Any]  # per point
    failures: list[dict[str, str]]


def _clip_metrics(names: Sequence[str], recon: torch.Tensor, video: torch.Tensor, lpips) -> dict[str, list[float]]:
    from evatok_cli.metrics import psnr_frames, ssim_frames

    out: dict[str, list[float]] = {}
    if "psnr" in names:
        out["psnr"] = psnr_frames(recon, video).mean(1).tolist()
    if "ssim" in names:
        out["ssim"] = ssim_frames(recon, video).mean(1).tolist()
    if "lpips" in names:
        out["lpips"] = lpips(recon, video, video.shape[2])[:, 0].tolist()
    return out


def _score(
    model,
    clips: _Clips,
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
) -> _Scored:
    """Reconstruct this rank's clips under every point; per-clip metrics and FVD statistics."""
    from torch.utils.data import DataLoader

    from evatok_cli.video import clip_key, to_model_input

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
    return _Scored(records, real, fake, failures)


def _reduce(scored: _Scored, env: DistEnv) -> _Scored:
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
    return _Scored(records, scored.real, scored.fake, failures)


def _means(records: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for m in metrics:
        vals = [r[m] for r in records if m in r]
        out[m] = float(np.mean(vals)) if vals else None
    return out


def _fvd_value(fvd, real, fake, deviations: list[str]) -> dict[str, Any] | None:
    try:
        return fvd.compute(real, fake).to_dict()
    except ValueError as e:  # fewer clips than a covariance needs
        deviations.append(f"FVD not computed: {e}")
        return None


# ------------------------------------------------------------------------------- shared setup
@dataclass
class _Weights:
    lpips: Any = None
    fvd: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    deviations: list[str] = field(default_factory=list)
    test_only: bool = False


def _resolve_metrics(metrics: Sequence[str] | None, *, i3d, lpips_weights) -> list[str]:
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


def _load_weights(
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
) -> _Weights:
    w = _Weights(info={"i3d": None, "lpips": None})
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


def _protocol(
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


def _load_tokenizer(path: str | Path, env: DistEnv):
    from evatok_cli.models.tokenizer import EVATokTokenizer
    from evatok_cli.train.checkpoints import resolve_model_dir

    tok_dir = resolve_model_dir(path)
    model = EVATokTokenizer.from_pretrained(tok_dir, map_location=env.device).eval()
    c = model.config
    return tok_dir, model, (c.frames, c.height, c.width)


def _finish(report: EvalReport, env: DistEnv, t0: float) -> EvalReport:
    report.standard = not report.deviations
    report.created_utc = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    report.wall_s = time.perf_counter() - t0
    report.world_size, report.rank = env.world_size, env.rank
    return report


def _savings(mean_tokens: float | None, uniform: int) -> float | None:
    return None if mean_tokens is None else 1.0 - mean_tokens / uniform


def _token_summary(mean_tokens: float | None, space: Any, protocol: Protocol) -> dict[str, Any]:
    """Mean tokens, the saving against the uniform assignment at the largest level, and against the
    protocol's reference count (the paper's 1024) when it names one."""
    uniform = space.levels[-1] * space.blocks
    out = {"mean_tokens": mean_tokens, "uniform_tokens": uniform, "token_savings": _savings(mean_tokens, uniform)}
    if protocol.reference_tokens is not None:
        out["reference_tokens"] = protocol.reference_tokens
        out["savings_vs_reference"] = _savings(mean_tokens, protocol.reference_tokens)
    return out


# --------------------------------------------------------------------------- reconstruction
def evaluate_reconstruction(
    tokenizer: str | Path,
    data: Sequence[str | Path],
    *,
    protocol: str | None = None,
    assignment: str | None = None,
    router: str | Path | None = None,
    w_q: float | None = None,
    w_l: float | None = None,
    metrics: Sequence[str] | None = None,
    i3d: str | Path | None = None,
    i3d_variant: str | None = None,
    lpips_weights: str | Path | None = None,
    lpips_heads: str | Path | None = None,
    lpips_net: str = "vgg",
    num_clips: int | None = None,
    clips: str | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str = "auto",
    stats_dir: str | Path | None = None,
    stdin=None,
) -> EvalReport:
    """Reconstruction quality of a tokenizer under a protocol (``evatok eval recon``).

    Args:
        tokenizer: a tokenizer model directory (or a training output directory: its latest step).
        data: video files, directories, ``-`` (paths on ``stdin``) or WebDataset tars: the
            protocol's split (e.g. the UCF-101 training videos of split 1 for ``ucf-rfvd``).
        protocol: a preset of :data:`~evatok_cli.protocols.PROTOCOLS`; None: a custom protocol at
            the tokenizer's geometry (the report is then non-standard).
        assignment: ``uniform:K`` or ``fixed:k1,...,kT`` (default: uniform at the largest level).
        router: a router model directory instead: each clip's assignment is the router's choice
            (reward head: with ``w_q`` / ``w_l``, default the router's training weights).
        metrics: among ``psnr, ssim, lpips, fvd``; default psnr, ssim, plus lpips / fvd when their
            weights are given.
        i3d: I3D weights (``i3d_torchscript.pt`` / ``i3d_pretrained_400.pt``) or ``random:SEED`` (tests).
        i3d_variant: ``styleganv`` or ``videogpt`` (default: the protocol's).
        lpips_weights, lpips_heads, lpips_net: LPIPS backbone (or ``random:SEED``), heads, net.
        num_clips: a seeded random subset of this many clips (smoke runs; non-standard report).
        clips: override the protocol's clips per video (``first``, ``all``, ``random``, N).
        batch_size: clips per tokenizer batch.
        workers: DataLoader decoding workers.
        stats_dir: also write the real / reconstruction FVD statistics there
            (``real.safetensors``, ``recon.safetensors``).

    Returns:
        The :class:`EvalReport` (complete on rank 0).
    """
    t0 = time.perf_counter()
    env = init_distributed(device)
    try:
        return _recon(
            tokenizer,
            data,
            env=env,
            t0=t0,
            protocol=protocol,
            assignment=assignment,
            router=router,
            w_q=w_q,
            w_l=w_l,
            metrics=metrics,
            i3d=i3d,
            i3d_variant=i3d_variant,
            lpips_weights=lpips_weights,
            lpips_heads=lpips_heads,
            lpips_net=lpips_net,
            num_clips=num_clips,
            clips=clips,
            batch_size=batch_size,
            workers=workers,
            stats_dir=stats_dir,
            stdin=stdin,
        )
    finally:
        shutdown(env)


def _check_batch(batch_size: int, workers: int) -> None:
    if batch_size < 1 or workers < 0:
        raise EvalError(f"need --batch-size >= 1 and --workers >= 0, got {batch_size} and {workers}")


def _recon(
    tokenizer,
    data,
    *,
    env: DistEnv,
    t0: float,
    protocol,
    assignment,
    router,
    w_q,
    w_l,
    metrics,
    i3d,
    i3d_variant,
    lpips_weights,
    lpips_heads,
    lpips_net,
    num_clips,
    clips,
    batch_size,
    workers,
    stats_dir,
    stdin,
) -> EvalReport:
    _check_batch(batch_size, workers)
    if assignment is not None and router is not None:
        raise EvalError("give either --assignment or --router, not both")
    names = _resolve_metrics(metrics, i3d=i3d, lpips_weights=lpips_weights)
    tok_dir, model, geometry = _load_tokenizer(tokenizer, env)
    proto, why = _protocol(protocol, geometry, "recon", clips=clips, i3d=i3d, i3d_variant=i3d_variant)
    space = model.space
    router_rec, policy_desc = None, None
    if router is not None:
        from evatok_cli.route import RouterPolicy
        from evatok_cli.train.checkpoints import resolve_model_dir

        policy = RouterPolicy.load(router, space, geometry, env.device, w_q=w_q, w_l=w_l)
        router_rec = _model_record(resolve_model_dir(router))
        head = policy.model.config.head
        policy_desc = {"router": str(router), "head": head}
        if head == "reward":
            policy_desc.update(w_q=policy.w_q, w_l=policy.w_l)
        point = Point("router", "router", policy_desc, lambda video, pred, pos: policy(video))
    else:
        fixed = space.parse(assignment or f"uniform:{space.levels[-1]}")
        policy_desc = {"fixed": list(fixed)}
        table = torch.tensor(fixed, dtype=torch.long)
        point = Point(
            assignment or f"uniform:{space.levels[-1]}",
            "fixed",
            policy_desc,
            lambda video, pred, pos: table.expand(video.shape[0], -1),
        )
    w = _load_weights(
        names,
        proto,
        env,
        i3d=i3d,
        i3d_variant=i3d_variant,
        lpips_weights=lpips_weights,
        lpips_heads=lpips_heads,
        lpips_net=lpips_net,
        batch_size=batch_size,
    )
    sel = _prepare_clips(data, proto, num_clips, env, stdin)
    scored = _reduce(
        _score(
            model,
            sel,
            [point],
            env,
            metrics=names,
            lpips=w.lpips,
            fvd=w.fvd,
            batch_size=batch_size,
            workers=workers,
            spec=proto.clip_spec(),
        ),
        env,
    )
    deviations = why + sel.deviations + w.deviations
    records = scored.records[0]
    if scored.failures:
        deviations.append(
            f"{len(scored.failures)} clips failed to decode (first: {scored.failures[0]['source']}: "
            f"{scored.failures[0]['reason']})"
        )
    mean_tokens = float(np.mean([r["tokens"] for r in records])) if records else None
    fvd_res = None
    if w.fvd is not None and env.is_main:
        fvd_res = _fvd_value(w.fvd, scored.real, scored.fake[0], deviations)
        if stats_dir is not None:
            d = Path(stats_dir)
            d.mkdir(parents=True, exist_ok=True)
            scored.real.save(d / "real.safetensors")
            scored.fake[0].save(d / "recon.safetensors")
    summary = {
        "clips": len(records),
        **_means(records, [m for m in names if m != "fvd"]),
        **({"fvd": fvd_res["fvd"] if fvd_res else None} if w.fvd is not None else {}),
        **_token_summary(mean_tokens, space, proto),
    }
    report = EvalReport(
        kind="recon",
        protocol=sel.protocol.to_dict(),
        standard=False,
        deviations=deviations,
        test_only=w.test_only,
        summary=summary,
        models={"tokenizer": _model_record(tok_dir), "router": router_rec},
        metric_weights=w.info,
        data={
            "inputs": [str(i) for i in data],
            "videos": len(sel.refs),
            "listing_sha256": sel.listing_sha256,
            "clips_available": sel.available,
            "clips": len(records),
            "failures": sel.failures + scored.failures,
        },
        settings={
            "assignment_policy": policy_desc,
            "metrics": names,
            "batch_size": batch_size,
            "device": str(env.device),
            "num_clips": num_clips,
            "clips": clips,
            "space": space.to_dict(),
        },
        seed=proto.seed,
        fvd=fvd_res,
        per_clip=[{k: v for k, v in r.items() if k != "pos"} for r in records],
    )
    return _finish(report, env, t0)


# ------------------------------------------------------------------------------- generation
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/evatok/fvd-stats`` (``~/.cache/evatok/fvd-stats`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "evatok" / "fvd-stats"


def real_stats_key(sel: _Clips, protocol: Protocol, i3d_info: dict[str, Any]) -> str:
    """Cache key of real statistics: the inputs listing, the selected clips and geometry, the I3D weights."""
    blob = {
        "format": 1,
        "listing_sha256": sel.listing_sha256,
        "clips": [[r.source, s] for _, r, s in sel.items],
        "clip": protocol.clip_spec().to_dict(),
        "i3d": {k: i3d_info[k] for k in ("variant", "sha256", "resolution")},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _real_stats(sel: _Clips, fvd, env: DistEnv, *, batch_size: int, workers: int, spec: Any):
    from torch.utils.data import DataLoader

    from evatok_cli.video import to_model_input

    stats = fvd.new_stats()
    failures: list[dict[str, str]] = []
    loader = DataLoader(
        ClipDataset(sel.mine(env), spec),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_clips,
    )
    for batch, bad in loader:
        failures += bad
        if batch["video"] is not None:
            fvd.update(stats, to_model_input(batch["video"]).to(env.device))
    stats.all_reduce()
    return stats, [f for part in all_gather_objects(failures, env) for f in part]


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(chunk)]).generate_state(1, dtype=np.uint64)[0] & (2**63 - 1))


def evaluate_generation(
    gpt: str | Path,
    tokenizer: str | Path,
    real: Sequence[str | Path],
    *,
    protocol: str,
    i3d: str | Path,
    i3d_variant: str | None = None,
    num_samples: int | None = None,
    num_clips: int | None = None,
    cfg_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 16,
    workers: int = 0,
    device: str = "auto",
    ema: bool = True,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    stdin=None,
) -> EvalReport:
    """gFVD of a class-conditional GPT under a protocol (``evatok eval gen``).

    Samples: sample i gets class ``i mod C`` (classes balanced); samples are drawn in chunks of
    ``batch_size``, chunk c with a generator seeded from ``(seed, c)`` and handed to rank
    ``c mod world_size``, so the samples do not depend on the number of ranks. Each sample is
    decoded by the tokenizer and its I3D features summed; statistics are all-reduced.

    Real statistics: the protocol's clips of ``real``, cached in ``cache_dir`` under
    ``real-<key>.safetensors`` with ``key`` = :func:`real_stats_key` (the inputs listing with file
    sizes, the selected clips, the geometry and the I3D weights sha256). A second run with the same
    inputs reads them instead of decoding the videos again.

    Args:
        gpt: a GPT model directory (or a training output directory).
        tokenizer: the tokenizer the GPT's token stores were written with (checked).
        real: the real videos of the protocol's split.
        protocol: a generation preset (``ucf-c2v-10k``, ``fvd2048-16f``, ``tiny``).
        i3d, i3d_variant: I3D weights (or ``random:SEED`` for tests) and variant (default: protocol's).
        num_samples: generated samples (default: the protocol's; another count is non-standard).
        num_clips: real clips: a seeded subset of this many (non-standard).
        cfg_scale: classifier-free guidance (default: the GPT preset's, PAPER §6).
        temperature, top_k, top_p: sampling (see :func:`evatok_cli.generate.generate`).
        seed: sampler seed (default: the protocol's seed).
        batch_size: samples per chunk (also clips per I3D batch for the real statistics).
        cache_dir: where real statistics are cached (default :func:`default_cache_dir`).
        use_cache: False to recompute (and not write) the real statistics.

    Returns:
        The :class:`EvalReport` (complete on rank 0).
    """
    t0 = time.perf_counter()
    env = init_distributed(device)
    try:
        return _gen(
            gpt,
            tokenizer,
            real,
            env=env,
            t0=t0,
            protocol=protocol,
            i3d=i3d,
            i3d_variant=i3d_variant,
            num_samples=num_samples,
            num_clips=num_clips,
            cfg_scale=cfg_scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            workers=workers,
            ema=ema,
            cache_dir=cache_dir,
            use_cache=use_cache,
            stdin=stdin,
        )
    finally:
        shutdown(env)


def _gen(
    gpt,
    tokenizer,
    real,
    *,
    env: DistEnv,
    t0: float,
    protocol,
    i3d,
    i3d_variant,
    num_samples,
    num_clips,
    cfg_scale,
    temperature,
    top_k,
    top_p,
    seed,
    batch_size,
    workers,
    ema,
    cache_dir,
    use_cache,
    stdin,
) -> EvalReport:
    from evatok_cli.checkpoint import read_model_meta
    from evatok_cli.generate import generate
    from evatok_cli.metrics import FeatureStats
    from evatok_cli.models.gpt import GPT
    from evatok_cli.sample import GenerateError, check_tokenizer, default_cfg_scale
    from evatok_cli.train.checkpoints import resolve_model_dir

    _check_batch(batch_size, workers)
    if i3d is None:
        raise EvalError("gFVD needs --i3d (i3d_torchscript.pt for the paper's protocols)")
    tok_dir, tok, geometry = _load_tokenizer(tokenizer, env)
    proto = get_protocol(protocol)
    if proto.task == "frame-prediction":
        raise EvalError(
            f"protocol {proto.name} is frame prediction ({proto.cond_frames} condition frames -> "
            f"{proto.frames}); evatok's sampler generates class-conditional sequences only"
        )
    proto, why = _protocol(protocol, geometry, "gen", clips=None, i3d=i3d, i3d_variant=i3d_variant)
    gpt_dir = resolve_model_dir(gpt)
    meta = read_model_meta(gpt_dir)
    if meta.get("model_kind") != "gpt":
        raise EvalError(f"{gpt_dir}: is a {meta.get('model_kind')!r} model, not a GPT")
    model = GPT.from_pretrained(gpt_dir, ema=ema, map_location=env.device).eval()
    try:
        check_tokenizer(gpt_dir, meta, model, tok_dir, tok)
    except GenerateError as e:
        raise EvalError(str(e)) from None
    cfg = model.config
    n = proto.num_samples if num_samples is None else int(num_samples)
    if n < 1:
        raise EvalError(f"--num-samples must be >= 1, got {n}")
    if num_samples is not None and num_samples != proto.num_samples:
        why.append(f"--num-samples {num_samples} overrides the protocol's {proto.num_samples} samples")
        proto = dataclasses.replace(proto, num_samples=n)
    scale = default_cfg_scale(meta.get("preset"), cfg.num_classes) if cfg_scale is None else float(cfg_scale)
    sampler_seed = proto.seed if seed is None else int(seed)
    w = _load_weights(
        ["fvd"],
        proto,
        env,
        i3d=i3d,
        i3d_variant=i3d_variant,
        lpips_weights=None,
        lpips_heads=None,
        lpips_net="vgg",
        batch_size=batch_size,
    )
    fvd = w.fvd

    # real statistics: cached on disk (rank 0 decides; every rank computes its share on a miss)
    sel = _prepare_clips(real, proto, num_clips, env, stdin)
    key = real_stats_key(sel, proto, w.info["i3d"])
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"real-{key[:32]}.safetensors"
    hit = bool(broadcast_object(use_cache and env.is_main and path.is_file(), env))
    real_failures: list[dict[str, str]] = []
    if hit:  # only rank 0 needs them: it alone computes the FVD
        real_stats = FeatureStats.load(path) if env.is_main else None
        side = path.with_suffix(".json")
        if env.is_main and side.is_file():  # clips that failed when the statistics were made
            real_failures = list(json.loads(side.read_text()).get("failures", []))
    else:
        real_stats, real_failures = _real_stats(
            sel, fvd, env, batch_size=batch_size, workers=workers, spec=proto.clip_spec()
        )
        if use_cache and env.is_main:
            cache.mkdir(parents=True, exist_ok=True)
            real_stats.save(path)
            side = {
                "key": key,
                "protocol": proto.name,
                "inputs": [str(i) for i in real],
                "clips": len(sel.items),
                "failures": real_failures,
                "i3d": w.info["i3d"],
                "evatok_version": __version__,
            }
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(side, indent=2))
            tmp.replace(path.with_suffix(".json"))

    # samples: chunk c -> rank c mod world, generator seeded by (seed, c)
    labels = balanced_labels(n, cfg.num_classes)  # no classes: the null class (id 0)
    chunks = list(range(0, n, batch_size))
    fake = fvd.new_stats()
    samples: list[dict[str, Any]] = []
    for c in range(env.rank, len(chunks), env.world_size):
        lo = chunks[c]
        chunk = labels[lo : lo + batch_size]
        gen = torch.Generator().manual_seed(_chunk_seed(sampler_seed, c))
        out = generate(
            model,
            torch.tensor(chunk),
            cfg_scale=scale,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=gen,
        )
        with torch.inference_mode():
            video = tok.decode([t.to(env.device) for t, _ in out], torch.stack([b for _, b in out]).to(env.device))
        fvd.update(fake, video.float())
        for j, (label, (tokens, bl)) in enumerate(zip(chunk, out)):
            samples.append(
                {
                    "index": lo + j,
                    "class": int(label),
                    "tokens": int(tokens.numel()),
                    "block_lengths": [int(k) for k in bl.tolist()],
                }
            )
    fake.all_reduce()
    samples = sorted((s for part in all_gather_objects(samples, env) for s in part), key=lambda s: s["index"])

    deviations = why + sel.deviations + w.deviations
    if real_failures:
        deviations.append(f"{len(real_failures)} real clips failed to decode (first: {real_failures[0]['source']})")
    fvd_res = _fvd_value(fvd, real_stats, fake, deviations) if env.is_main else None
    mean_tokens = float(np.mean([s["tokens"] for s in samples])) if samples else None
    per_class = Counter(s["class"] for s in samples)
    real_clips = fvd_res["n_real"] if fvd_res else (real_stats.count if real_stats is not None else None)
    summary = {
        "samples": len(samples),
        "real_clips": real_clips,
        "fvd": fvd_res["fvd"] if fvd_res else None,
        **_token_summary(mean_tokens, tok.space, proto),
        "cfg_scale": scale,
    }
    report = EvalReport(
        kind="gen",
        protocol=sel.protocol.to_dict(),
        standard=False,
        deviations=deviations,
        test_only=w.test_only,
        summary=summary,
        models={"tokenizer": _model_record(tok_dir), "gpt": _model_record(gpt_dir)},
        metric_weights=w.info,
        data={
            "inputs": [str(i) for i in real],
            "videos": len(sel.refs),
            "listing_sha256": sel.listing_sha256,
            "clips_available": sel.available,
            "clips": len(sel.items),
            "failures": sel.failures + real_failures,
            "real_stats_cache": {"path": str(path) if use_cache else None, "key": key, "hit": hit},
        },
        settings={
            "num_samples": n,
            "cfg_scale": scale,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "sampler_seed": sampler_seed,
            "batch_size": batch_size,
            "ema": ema,
            "device": str(env.device),
            "classes": cfg.num_classes,
            "per_class": {str(k): v for k, v in sorted(per_class.items())},
            "num_clips": num_clips,
        },
        seed=proto.seed,
        fvd=fvd_res,
        samples=samples,
    )
    return _finish(report, env, t0)


# ------------------------------------------------------------------------------------ curve
def equal_quality_tokens(uniform: Sequence[tuple[float, float]], value: float, higher_is_better: bool) -> float | None:
    """Tokens the uniform curve needs to reach ``value`` (PAPER Fig. 4 "at equal quality").

    Linear interpolation in log2(tokens) between consecutive uniform points (tokens, metric),
    taking the first crossing from the fewest tokens; None when ``value`` lies outside the range
    the uniform points span.
    """
    pts = sorted((float(t), float(m)) for t, m in uniform if m is not None and math.isfinite(m))
    if not pts:
        return None
    sign = 1.0 if higher_is_better else -1.0
    q = [(math.log2(t), sign * m) for t, m in pts]
    v = sign * value
    if v <= q[0][1]:
        return pts[0][0] if v == q[0][1] else None
    for (x0, y0), (x1, y1) in zip(q, q[1:]):
        if y0 < v <= y1:
            return float(2 ** (x0 + (v - y0) / (y1 - y0) * (x1 - x0)))
    return None


def _parse_floats(values: Sequence[float] | str | None) -> list[float] | None:
    if values is None:
        return None
    if isinstance(values, str):
        try:
            return [float(x) for x in values.split(",") if x.strip()]
        except ValueError:
            raise EvalError(f"expected comma-separated numbers, got {values!r}") from None
    return [float(x) for x in values]


def _router_predictions(router, sel: _Clips, env: DistEnv, *, batch_size: int, workers: int, spec: Any) -> np.ndarray:
    """(N, m^T) router outputs of every selected clip (all ranks gathered), for budget solving."""
    from torch.utils.data import DataLoader

    from evatok_cli.video import to_model_input

    pos, preds = [], []
    loader = DataLoader(
        ClipDataset(sel.mine(env), spec), batch_size=batch_size, num_workers=workers, collate_fn=collate_clips
    )
    with torch.inference_mode():
        for batch, _ in loader:
            if batch["video"] is not None:
                preds.append(router.predict(to_model_input(batch["video"]).to(env.device)).cpu().numpy())
                pos += batch["pos"]
    parts = all_gather_objects((pos, np.concatenate(preds) if preds else None), env)
    out = np.full((len(sel.items), len(router.space)), np.nan, dtype=np.float32)
    for p, pr in parts:
        if pr is not None:
            out[np.asarray(p, dtype=np.int64)] = pr
    return out


def evaluate_curve(
    tokenizer: str | Path,
    data: Sequence[str | Path],
    *,
    router: str | Path | None = None,
    w_q: Sequence[float] | str | None = None,
    budgets: Sequence[float] | str | None = None,
    metrics: Sequence[str] | None = ("psnr",),
    protocol: str | None = None,
    i3d: str | Path | None = None,
    i3d_variant: str | None = None,
    lpips_weights: str | Path | None = None,
    lpips_heads: str | Path | None = None,
    lpips_net: str = "vgg",
    num_clips: int | None = None,
    clips: str | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str = "auto",
    stdin=None,
) -> EvalReport:
    """The quality-cost curve of PAPER Fig. 4 (``evatok eval curve``).

    Points: the uniform assignment at every level, then, with a router, one point per ``w_q``
    (reward head: argmax of w_q * Q_hat - (2 - w_q) * Lz, PAPER §3; default 0.8, 1.2, 1.6) or per
    budget (reward head: mean tokens <= budget over the clips, :func:`evatok_cli.route.budget_assignments`);
    a classify head gives one point (its trade-off was fixed at training). Every clip is decoded
    once and reconstructed under every point.

    Each router point also gets ``equal_quality_tokens`` (:func:`equal_quality_tokens`, on the
    first metric) and ``savings_at_equal_quality`` = 1 - mean tokens / that.

    Args: as :func:`evaluate_reconstruction`; ``metrics`` default ``psnr`` (any of psnr, ssim,
    lpips, fvd; the first one drives the savings and the plot's first panel).

    Returns:
        The :class:`EvalReport` (kind ``curve``; ``points`` and a flat ``summary``).
    """
    t0 = time.perf_counter()
    env = init_distributed(device)
    try:
        return _curve(
            tokenizer,
            data,
            env=env,
            t0=t0,
            router=router,
            w_q=w_q,
            budgets=budgets,
            metrics=metrics,
            protocol=protocol,
            i3d=i3d,
            i3d_variant=i3d_variant,
            lpips_weights=lpips_weights,
            lpips_heads=lpips_heads,
            lpips_net=lpips_net,
            num_clips=num_clips,
            clips=clips,
            batch_size=batch_size,
            workers=workers,
            stdin=stdin,
        )
    finally:
        shutdown(env)


def _curve(
    tokenizer,
    data,
    *,
    env: DistEnv,
    t0: float,
    router,
    w_q,
    budgets,
    metrics,
    protocol,
    i3d,
    i3d_variant,
    lpips_weights,
    lpips_heads,
    lpips_net,
    num_clips,
    clips,
    batch_size,
    workers,
    stdin,
) -> EvalReport:
    _check_batch(batch_size, workers)
    names = _resolve_metrics(metrics, i3d=i3d, lpips_weights=lpips_weights)
    w_qs, budget_list = _parse_floats(w_q), _parse_floats(budgets)
    if router is None and (w_qs or budget_list):
        raise EvalError("--w-q and --budgets need --router")
    if w_qs and budget_list:
        raise EvalError("give either --w-q or --budgets, not both")
    tok_dir, model, geometry = _load_tokenizer(tokenizer, env)
    proto, why = _protocol(protocol, geometry, "recon", clips=clips, i3d=i3d, i3d_variant=i3d_variant)
    space = model.space
    points = []
    for k in space.levels:
        fixed = torch.tensor(space.uniform(k), dtype=torch.long)
        points.append(
            Point(
                f"uniform-{k}",
                "uniform",
                {"k": int(k)},
                lambda video, pred, pos, fixed=fixed: fixed.expand(video.shape[0], -1),
            )
        )
    w = _load_weights(
        names,
        proto,
        env,
        i3d=i3d,
        i3d_variant=i3d_variant,
        lpips_weights=lpips_weights,
        lpips_heads=lpips_heads,
        lpips_net=lpips_net,
        batch_size=batch_size,
    )
    sel = _prepare_clips(data, proto, num_clips, env, stdin)
    router_model, router_rec = None, None
    if router is not None:
        from evatok_cli.route import RouterPolicy, budget_assignments, choose_assignments
        from evatok_cli.train.checkpoints import resolve_model_dir

        policy = RouterPolicy.load(router, space, geometry, env.device)
        router_model, router_rec = policy.model, _model_record(resolve_model_dir(router))
        head = router_model.config.head
        table = torch.as_tensor(space.table())
        if budget_list and head != "reward":
            raise EvalError(f"--budgets needs a reward-head router; {router} has a {head!r} head")
        if head == "classify":
            if w_qs:
                log.warning("a classify-head router fixed its trade-off at training: --w-q is ignored (one point)")
            points.append(
                Point(
                    "router",
                    "router",
                    {"head": head},
                    lambda video, pred, pos: table[torch.as_tensor(choose_assignments(pred, "classify", space))],
                )
            )
        elif budget_list:
            preds = _router_predictions(
                router_model, sel, env, batch_size=batch_size, workers=workers, spec=proto.clip_spec()
            )
            for b in budget_list:
                idx, lam = budget_assignments(preds, space, b)
                chosen = table[torch.as_tensor(idx)]
                points.append(
                    Point(
                        f"router-budget-{b:g}",
                        "router",
                        {"head": head, "budget": b, "lambda": lam},
                        lambda video, pred, pos, chosen=chosen: chosen[torch.as_tensor(pos)],
                    )
                )
            router_model = None  # the assignments are solved: no per-batch prediction needed
        else:
            for q in w_qs or DEFAULT_W_Q:
                points.append(
                    Point(
                        f"router-wq-{q:g}",
                        "router",
                        {"head": head, "w_q": q, "w_l": 2.0 - q},
                        lambda video, pred, pos, q=q: table[
                            torch.as_tensor(choose_assignments(pred, "reward", space, q, 2.0 - q))
                        ],
                    )
                )
    scored = _reduce(
        _score(
            model,
            sel,
            points,
            env,
            metrics=names,
            lpips=w.lpips,
            fvd=w.fvd,
            router=router_model,
            batch_size=batch_size,
            workers=workers,
            spec=proto.clip_spec(),
        ),
        env,
    )
    deviations = why + sel.deviations + w.deviations
    if scored.failures:
        deviations.append(f"{len(scored.failures)} clips failed to decode (first: {scored.failures[0]['source']})")
    uniform_tokens = space.levels[-1] * space.blocks
    out_points: list[dict[str, Any]] = []
    clip_names = [m for m in names if m != "fvd"]
    for p, point in enumerate(points):
        recs = scored.records[p]
        mean_tokens = float(np.mean([r["tokens"] for r in recs])) if recs else None
        values = _means(recs, clip_names)
        if w.fvd is not None:
            res = _fvd_value(w.fvd, scored.real, scored.fake[p], deviations) if env.is_main else None
            values["fvd"] = res["fvd"] if res else None
        out_points.append(
            {
                "label": point.label,
                "kind": point.kind,
                "params": point.params,
                "clips": len(recs),
                "mean_tokens": mean_tokens,
                "token_savings": _savings(mean_tokens, uniform_tokens),
                **{m: values.get(m) for m in names},
            }
        )
    first = names[0]
    uni = [(pt["mean_tokens"], pt[first]) for pt in out_points if pt["kind"] == "uniform"]
    summary: dict[str, Any] = {"clips": len(sel.items)}
    for pt in out_points:
        if pt["kind"] != "uniform":
            eq = None if pt[first] is None else equal_quality_tokens(uni, pt[first], HIGHER_IS_BETTER[first])
            pt["equal_quality_tokens"] = eq
            pt["savings_at_equal_quality"] = (
                None if eq is None or pt["mean_tokens"] is None else 1.0 - pt["mean_tokens"] / eq
            )
        summary[f"{pt['label']}/mean_tokens"] = pt["mean_tokens"]
        for m in names:
            summary[f"{pt['label']}/{m}"] = pt[m]
        if "savings_at_equal_quality" in pt:
            summary[f"{pt['label']}/savings_at_equal_{first}"] = pt["savings_at_equal_quality"]
    report = EvalReport(
        kind="curve",
        protocol=sel.protocol.to_dict(),
        standard=False,
        deviations=deviations,
        test_only=w.test_only,
        summary=summary,
        models={"tokenizer": _model_record(tok_dir), "router": router_rec},
        metric_weights=w.info,
        data={
            "inputs": [str(i) for i in data],
            "videos": len(sel.refs),
            "listing_sha256": sel.listing_sha256,
            "clips_available": sel.available,
            "clips": len(sel.items),
            "failures": sel.failures + scored.failures,
        },
        settings={
            "metrics": names,
            "w_q": w_qs,
            "budgets": budget_list,
            "batch_size": batch_size,
            "device": str(env.device),
            "num_clips": num_clips,
            "clips": clips,
            "space": space.to_dict(),
        },
        seed=proto.seed,
        points=out_points,
    )
    return _finish(report, env, t0)


__all__ = [
    "EvalError",
    "EvalReport",
    "NotComparable",
    "Point",
    "compare_reports",
    "comparable",
    "default_cache_dir",
    "equal_quality_tokens",
    "evaluate_curve",
    "evaluate_generation",
    "evaluate_reconstruction",
    "listing_sha256",
    "load_fvd",
    "load_lpips",
    "load_report",
    "matplotlib_available",
    "plan_clips",
    "plot_curve",
    "real_stats_key",
    "render_markdown",
    "write_report",
]
