"""``evatok train gpt``: train the AR GPT on token stores (EVATok §4.1, PAPER §6).

Usage:
    evatok train gpt --tokens ucf.zarr --preset gpt-b --out runs/gpt --epochs 3000 --batch-size 128
    evatok train gpt --tokens part1.zarr --tokens part2.zarr --preset tiny --out runs/g --steps 2000 --lr 3e-4
    evatok train gpt --tokens ucf.zarr --preset gpt-b --out runs/gpt --epochs 3000 --resume
    evatok train gpt --tokens ucf.zarr --preset gpt-b --out runs/gpt --epochs 3000 --dropout 0.1 --token-dropout 0.1
    torchrun --nproc_per_node 8 -m evatok_cli train gpt --tokens k600/ --preset gpt-l --out runs/k --epochs 75
    evatok train gpt --tokens k600-fp.zarr --preset gpt-l-plus --out runs/fp --epochs 75 --prefix-blocks 2
"""

from __future__ import annotations

import os
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
    keys = ("loss", "grad_norm", "tokens", "pad_frac", "lr", "samples_per_s")
    parts = [f"step {rec['step']}"] + [f"{k} {rec[k]:.4g}" for k in keys if k in rec]
    err_console.print("  ".join(parts), markup=False, highlight=False)


def gpt(
    tokens: Annotated[
        list[Path],
        typer.Option("--tokens", help="Token store(s) written by `evatok encode` (repeatable).", show_default=False),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output directory (checkpoints step-N/).", show_default=False)
    ],
    preset: Annotated[str, typer.Option("--preset", help="tiny, gpt-b, gpt-l or gpt-l-plus.")] = "gpt-b",
    steps: Annotated[
        int | None, typer.Option("--steps", help="Total optimisation steps (or give --epochs).", show_default=False)
    ] = None,
    epochs: Annotated[
        float | None, typer.Option("--epochs", help="Passes over the stores, converted to steps.", show_default=False)
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Sequences per step per process.")] = 32,
    class_dropout: Annotated[float, typer.Option("--class-dropout", help="Probability of the null class (CFG).")] = 0.1,
    dropout: Annotated[
        float,
        typer.Option(
            "--dropout",
            help="Residual dropout after attention and FFN-output dropout (LlamaGen: 0.1; the paper is silent).",
        ),
    ] = 0.0,
    token_dropout: Annotated[
        float, typer.Option("--token-dropout", help="Dropout on the input token embeddings (LlamaGen: 0.1).")
    ] = 0.0,
    lr: Annotated[
        float, typer.Option("--lr", help="Learning rate (WSD: constant, then linear to 0 over the last 20%).")
    ] = 1e-4,
    warmup: Annotated[int, typer.Option("--warmup", help="Linear warmup steps.")] = 0,
    prefix_blocks: Annotated[
        int,
        typer.Option(
            "--prefix-blocks",
            help="Frame prediction: the first N blocks are a fixed-assignment condition, not predicted (paper: 2).",
        ),
    ] = 0,
    prefix_assignment: Annotated[
        str | None,
        typer.Option(
            "--prefix-assignment",
            help="Block lengths of the prefix: paper (the paper's (512,128) mapped to the levels), max or k1,...,kN.",
            show_default=False,
        ),
    ] = None,
    resume: ResumeOpt = False,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader workers reading the stores.")] = 1,
    checkpoint_every: CheckpointEveryOpt = 1000,
    keep_last: KeepLastOpt = 3,
    log_every: LogEveryOpt = 50,
    stop_at: StopAtOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Train the class-conditional GPT over adaptive-length token sequences."""
    from evatok_cli.checkpoint import CheckpointError
    from evatok_cli.models.gpt import GPT_PRESETS
    from evatok_cli.store import StoreError
    from evatok_cli.train.gpt import train_gpt
    from evatok_cli.train.loop import ResumeError

    if preset not in GPT_PRESETS:
        fail(f"unknown preset {preset!r} (choose from {', '.join(GPT_PRESETS)})", code=2)
    if (steps is None) == (epochs is None):
        fail("give exactly one of --steps and --epochs", code=2)
    for name, p in (("--dropout", dropout), ("--token-dropout", token_dropout)):
        if not 0.0 <= p < 1.0:
            fail(f"{name} must be in [0, 1), got {p}", code=2)
    if prefix_blocks < 0:
        fail(f"--prefix-blocks must be >= 0, got {prefix_blocks}", code=2)
    if prefix_assignment is not None and not prefix_blocks:
        fail("--prefix-assignment needs --prefix-blocks", code=2)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        final = train_gpt(
            tokens=tokens,
            preset=preset,
            out=out,
            steps=steps,
            epochs=epochs,
            batch_size=batch_size,
            resume=resume,
            seed=seed,
            device=device,
            workers=workers,
            checkpoint_every=checkpoint_every,
            keep_last=keep_last,
            log_every=log_every,
            stop_at=stop_at,
            on_log=None if quiet else _log_line,
            lr=lr,
            warmup=warmup,
            class_dropout=class_dropout,
            dropout=dropout,
            token_dropout=token_dropout,
            prefix_blocks=prefix_blocks,
            prefix_assignment=prefix_assignment,
        )
    except (ResumeError, StoreError, CheckpointError, ValueError) as e:
        fail(str(e), code=1)
    if rank0 and not quiet:
        err_console.print(f"saved {final}", markup=False)
