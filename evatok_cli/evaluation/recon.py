"""``evatok eval recon``: reconstruction quality of a tokenizer under a protocol."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evatok_cli.assign import RouterPolicy, router_label
from evatok_cli.evaluation.engine import (
    EvalError,
    Point,
    check_batch,
    finish_report,
    fvd_value,
    load_metric_weights,
    load_tokenizer,
    metric_means,
    prepare_clips,
    reduce_scores,
    resolve_metrics,
    resolve_protocol,
    score_points,
    token_summary,
)
from evatok_cli.evaluation.report import (
    EvalReport,
)
from evatok_cli.runtime import DistEnv, process_group

log = logging.getLogger(__name__)


def evaluate_reconstruction(
    tokenizer: str | Path,
    data: Sequence[str | Path],
    *,
    protocol: str | None = None,
    assignment: str | None = None,
    router: str | Path | Sequence[str | Path] | None = None,
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
        protocol: a preset of :data:`~evatok_cli.evaluation.protocols.PROTOCOLS`; None: a custom protocol at
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
    with process_group(device) as env:
        check_batch(batch_size, workers)
        if assignment is not None and router is not None:
            raise EvalError("give either --assignment or --router, not both")
        names = resolve_metrics(metrics, i3d=i3d, lpips_weights=lpips_weights)
        tok_open, model, geometry = load_tokenizer(tokenizer, env)
        proto, why = resolve_protocol(protocol, geometry, "recon", clips=clips, i3d=i3d, i3d_variant=i3d_variant)
        space = model.space
        point, router_rec = _policy_point(router, assignment, space, geometry, env, w_q=w_q, w_l=w_l)
        w = load_metric_weights(
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
        sel = prepare_clips(data, proto, num_clips, env, stdin)
        scored = reduce_scores(
            score_points(
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
            fvd_res = fvd_value(w.fvd, scored.real, scored.fake[0], deviations)
            if stats_dir is not None:
                d = Path(stats_dir)
                d.mkdir(parents=True, exist_ok=True)
                scored.real.save(d / "real.safetensors")
                scored.fake[0].save(d / "recon.safetensors")
        summary = {
            "clips": len(records),
            **metric_means(records, [m for m in names if m != "fvd"]),
            **({"fvd": fvd_res["fvd"] if fvd_res else None} if w.fvd is not None else {}),
            **token_summary(mean_tokens, space, proto),
        }
        report = EvalReport(
            kind="recon",
            protocol=sel.protocol.to_dict(),
            standard=False,
            deviations=deviations,
            test_only=w.test_only,
            summary=summary,
            models={"tokenizer": tok_open.record(), "router": router_rec},
            metric_weights=w.info,
            data=sel.record(data, len(records), scored.failures),
            settings={
                "assignment_policy": point.params,
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
        return finish_report(report, env, t0)


def _policy_point(router: str | Path | Sequence[str | Path] | None, assignment: str | None, space: Any, geometry: tuple[int, int, int],
                  env: DistEnv, *, w_q: float | None, w_l: float | None) -> tuple[Point, dict[str, Any] | None]:  # fmt: skip
    """The one point recon scores: the router's choice (and the router's record), or a fixed assignment."""
    if router is not None:
        policy = RouterPolicy.load(router, space, geometry, env.device, w_q=w_q, w_l=w_l)
        head = policy.model.config.head
        desc: dict[str, Any] = {"router": router_label(router), "head": head}
        if head == "reward":
            desc.update(w_q=policy.w_q, w_l=policy.w_l)
        return Point("router", "router", desc, lambda video, pred, pos: policy(video)), policy.source.record()
    name = assignment or f"uniform:{space.levels[-1]}"
    fixed = space.parse(name)
    table = torch.tensor(fixed, dtype=torch.long)
    return Point(name, "fixed", {"fixed": list(fixed)}, lambda video, pred, pos: table.expand(video.shape[0], -1)), None
