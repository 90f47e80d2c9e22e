"""``evatok eval recon``: reconstruction quality of a tokenizer under a protocol."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from evatok_cli.assign import RouterPolicy
from evatok_cli.evaluation.engine import (
    EvalError,
    Point,
    _check_batch,
    _finish,
    _fvd_value,
    _load_tokenizer,
    _load_weights,
    _means,
    _prepare_clips,
    _protocol,
    _reduce,
    _resolve_metrics,
    _score,
    _token_summary,
)
from evatok_cli.evaluation.report import (
    EvalReport,
)
from evatok_cli.runtime import process_group

log = logging.getLogger(__name__)


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
        _check_batch(batch_size, workers)
        if assignment is not None and router is not None:
            raise EvalError("give either --assignment or --router, not both")
        names = _resolve_metrics(metrics, i3d=i3d, lpips_weights=lpips_weights)
        tok_open, model, geometry = _load_tokenizer(tokenizer, env)
        proto, why = _protocol(protocol, geometry, "recon", clips=clips, i3d=i3d, i3d_variant=i3d_variant)
        space = model.space
        router_rec, policy_desc = None, None
        if router is not None:
            policy = RouterPolicy.load(router, space, geometry, env.device, w_q=w_q, w_l=w_l)
            router_rec = policy.source.record()
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
            models={"tokenizer": tok_open.record(), "router": router_rec},
            metric_weights=w.info,
            data=sel.record(data, len(records), scored.failures),
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
