"""``evatok train router``: train the router on the labels of ``evatok search`` (stage 3).

Usage:
    evatok train router --labels labels.zarr --data videos/ --head classify --preset paper --out runs/router
    evatok train router --labels labels.zarr --data videos/ --head reward --preset small --out runs/rr --steps 20000
    evatok train router --labels labels.zarr --data videos/ --head reward --reward-form blocks --out runs/rb
    evatok train router --labels labels.zarr --labels more.zarr --data videos/ --data more/ --head reward --out runs/r2
    evatok train router --labels labels.zarr --data videos/ --head classify --soft-tau 0.1 --w-q 1.4 --w-l 0.6 --out r
    torchrun --nproc_per_node 8 -m evatok_cli train router --labels l.zarr --data webvid/ --preset paper --out runs/r
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from evatok_cli.cli._render import err_console, fail
from evatok_cli.cli.options import (
    CheckpointEveryOpt,
    DeviceOpt,
    KeepLastOpt,
    LogEveryOpt,
    QuietOpt,
    ResumeOpt,
    SeedOpt,
    StopAtOpt,
)


def _log_line(rec: dict[str, Any]) -> None:
    keys = ("loss", "top1", "grad_norm", "lr", "samples_per_s")
    parts = [f"step {rec['step']}"] + [f"{k} {rec[k]:.4g}" for k in keys if k in rec]
    err_console.print("  ".join(parts), markup=False, highlight=False)


def router(
    labels: Annotated[
        list[Path],
        typer.Option(
            "--labels",
            help="Labels store written by `evatok search`; repeat for stores of one search setup (read as one).",
            show_default=False,
        ),
    ],
    data: Annotated[
        list[str],
        typer.Option(
            "--data", help="Videos holding the labels' sources: files, directories, '-' or tars.", show_default=False
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output directory (checkpoints step-N/).", show_default=False)
    ],
    head: Annotated[
        str, typer.Option("--head", help="classify (argmax label, cross-entropy) or reward (regress Q).")
    ] = "classify",
    preset: Annotated[str, typer.Option("--preset", help="tiny, small or paper (ViT-S).")] = "small",
    steps: Annotated[int, typer.Option("--steps", help="Total optimisation steps.")] = 10_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per step per process.")] = 32,
    reward_form: Annotated[
        str,
        typer.Option(
            "--reward-form",
            help="Reward head: joint (one output per assignment) or blocks (one per block and level, averaged).",
        ),
    ] = "joint",
    quality: Annotated[
        str,
        typer.Option(
            "--quality",
            help="Reward head targets: calibrated (the paper's z-scored Q) or per-clip (Q minus the clip's mean; same routing).",
        ),
    ] = "calibrated",
    flip: Annotated[
        bool, typer.Option("--flip", help="Mirror a random half of each batch left-right (augmentation).")
    ] = False,
    soft_tau: Annotated[
        float | None, typer.Option("--soft-tau", help="Classify head: soft targets softmax(R/T).")
    ] = None,
    w_q: Annotated[
        float | None, typer.Option("--w-q", help="Quality weight of the targets (default: the labels').")
    ] = None,
    w_l: Annotated[
        float | None, typer.Option("--w-l", help="Length weight of the targets (default: the labels').")
    ] = None,
    resume: ResumeOpt = False,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine to 1e-6).")] = 3e-4,
    warmup: Annotated[int, typer.Option("--warmup", help="Warmup steps (at most steps/10).")] = 500,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader decoding workers.")] = 2,
    checkpoint_every: CheckpointEveryOpt = 1000,
    keep_last: KeepLastOpt = 3,
    log_every: LogEveryOpt = 50,
    stop_at: StopAtOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Train a router that predicts each clip's best token assignment (stage 3)."""
    from evatok_cli.models.router import HEADS, REWARD_FORMS, ROUTER_PRESETS
    from evatok_cli.store import StoreError
    from evatok_cli.train.loop import ResumeError
    from evatok_cli.train.router import train_router
    from evatok_cli.video import VideoError

    if preset not in ROUTER_PRESETS:
        fail(f"unknown preset {preset!r} (choose from {', '.join(ROUTER_PRESETS)})", code=2)
    if head not in HEADS:
        fail(f"--head must be classify or reward, got {head!r}", code=2)
    if soft_tau is not None and head != "classify":
        fail("--soft-tau applies to --head classify only", code=2)
    if reward_form not in REWARD_FORMS:
        fail(f"--reward-form must be joint or blocks, got {reward_form!r}", code=2)
    if reward_form != "joint" and head != "reward":
        fail("--reward-form applies to --head reward only", code=2)
    if quality not in ("calibrated", "per-clip"):
        fail(f"--quality must be calibrated or per-clip, got {quality!r}", code=2)
    if quality != "calibrated" and head != "reward":
        fail("--quality applies to --head reward only", code=2)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        final = train_router(
            labels=labels,
            data=data,
            head=head,
            preset=preset,
            out=out,
            steps=steps,
            batch_size=batch_size,
            reward_form=reward_form,
            quality=quality,
            flip=flip,
            soft_tau=soft_tau,
            w_q=w_q,
            w_l=w_l,
            resume=resume,
            seed=seed,
            device=device,
            workers=workers,
            checkpoint_every=checkpoint_every,
            keep_last=keep_last,
            log_every=log_every,
            stop_at=stop_at,
            stdin=sys.stdin if "-" in data else None,
            on_log=None if quiet else _log_line,
            lr=lr,
            warmup=warmup,
        )
    except (ResumeError, VideoError, StoreError, ValueError) as e:
        fail(str(e), code=1)
    if rank0 and not quiet:
        err_console.print(f"saved {final}", markup=False)
