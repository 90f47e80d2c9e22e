"""``evatok train``: train the models of the method.

Usage:
    evatok train tokenizer --stage proxy --preset small --data videos/ --out runs/proxy --steps 20000
    evatok train tokenizer --stage proxy --preset small --data videos/ --out runs/proxy --steps 40000 --resume
    evatok train tokenizer --stage final --preset small --data videos/ --out runs/uniform --assignment uniform:128
    evatok train tokenizer --stage final --preset small --data videos/ --out runs/final --router runs/router
    evatok train tokenizer --stage final --preset small --data mine/ --out runs/mine --init runs/final --steps 2000
    evatok train tokenizer --stage final --preset paper --data ucf/ --out runs/final --router runs/router \
        --codebook-size 8192 --lpips-backbone weights/vgg16-397923af.pth \
        --align-teacher weights/vjepa2-vitl-fpc64-256 --disc-teacher weights/videomae-base   # docs/training.md
    torchrun --nproc_per_node 8 -m evatok_cli train tokenizer --stage proxy --preset paper --data webvid/ --out runs/p \
        --lpips-backbone weights/vgg16-397923af.pth
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from evatok_cli.cli._render import err_console, fail
from evatok_cli.cli.options import (
    ENSEMBLE_HELP,
    CheckpointEveryOpt,
    DeviceOpt,
    KeepLastOpt,
    LogEveryOpt,
    QuietOpt,
    ResumeOpt,
    SeedOpt,
    StopAtOpt,
    router_option,
)
from evatok_cli.cli.train_gpt import gpt as _gpt
from evatok_cli.cli.train_router import router as _router

app = typer.Typer(
    help="Train the models of the method: tokenizer (stages 1 and 4), router (stage 3), GPT.", no_args_is_help=True
)


def _log_line(rec: dict[str, Any]) -> None:
    keys = (
        "loss",
        "l1",
        "perceptual",
        "psnr",
        "usage",
        "perplexity",
        "tokens",
        "g_adv",
        "d_loss",
        "align",
        "g_sem",
        "d_sem_loss",
        "lr",
        "samples_per_s",
    )
    parts = [f"step {rec['step']}"] + [f"{k} {rec[k]:.4g}" for k in keys if k in rec]
    err_console.print("  ".join(parts), markup=False, highlight=False)


@app.command("tokenizer")
def tokenizer(
    data: Annotated[
        list[str],
        typer.Option(
            "--data", help="Video files, directories, '-' (paths on stdin) or WebDataset tars.", show_default=False
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output directory (checkpoints step-N/).", show_default=False)
    ],
    stage: Annotated[str, typer.Option("--stage", help="proxy (random assignments) or final.")] = "proxy",
    preset: Annotated[str, typer.Option("--preset", help="tiny, small or paper.")] = "small",
    steps: Annotated[int, typer.Option("--steps", help="Total optimisation steps.")] = 10_000,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per step per process.")] = 8,
    assignment: Annotated[
        str | None, typer.Option("--assignment", help="random, uniform:K or fixed:k1,...,kT.")
    ] = None,
    router: Annotated[
        list[Path] | None,
        typer.Option("--router", help="Final stage: a router assigns every training clip." + ENSEMBLE_HELP),
    ] = None,
    w_q: Annotated[
        float | None,
        typer.Option(
            "--w-q",
            help="With --router (reward head): quality weight of its trade-off (default: its labels').",
            show_default=False,
        ),
    ] = None,
    w_l: Annotated[
        float | None,
        typer.Option(
            "--w-l",
            help="With --router (reward head): length weight of its trade-off (default: its labels').",
            show_default=False,
        ),
    ] = None,
    init: Annotated[
        Path | None,
        typer.Option(
            "--init",
            help="Start from this tokenizer's weights (EMA when present; a model or training --out directory, same preset), fresh optimizer and schedule; ignored when --resume finds a checkpoint.",
            show_default=False,
        ),
    ] = None,
    resume: ResumeOpt = False,
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (cosine to 1e-6).")] = 1e-4,
    warmup: Annotated[int, typer.Option("--warmup", help="Warmup steps (at most steps/10).")] = 1000,
    disc_start: Annotated[int, typer.Option("--disc-start", help="Step at which the PatchGAN loss starts.")] = 20_000,
    no_disc: Annotated[bool, typer.Option("--no-disc", help="Train without the adversarial loss.")] = False,
    codebook_size: Annotated[
        int | None,
        typer.Option(
            "--codebook-size",
            help="VQ codebook entries (default: the preset's; paper: 16384, 8192 for the UCF/K600 final tokenizers). Recorded in config.json.",
            show_default=False,
        ),
    ] = None,
    patch_depth: Annotated[
        int | None,
        typer.Option(
            "--patch-depth",
            help="Block-causal layers over the patches before the Q-Former (default: the preset's; paper: 0, linear embedding).",
            show_default=False,
        ),
    ] = None,
    dec_locality_bias: Annotated[
        float | None,
        typer.Option(
            "--dec-locality-bias",
            help="Initial learned decoder cross-attention bias towards covering tokens (default: the preset's; paper: 0, off).",
            show_default=False,
        ),
    ] = None,
    lpips_backbone: Annotated[
        Path | None,
        typer.Option(
            "--lpips-backbone",
            help="torchvision VGG16/AlexNet state dict: adds the LPIPS perceptual loss (required at --preset paper unless --no-lpips).",
            show_default=False,
        ),
    ] = None,
    no_lpips: Annotated[
        bool, typer.Option("--no-lpips", help="Train without the LPIPS perceptual loss on purpose.")
    ] = False,
    lpips_heads: Annotated[
        Path | None,
        typer.Option(
            "--lpips-heads", help="LPIPS linear heads (default: the installed lpips package's).", show_default=False
        ),
    ] = None,
    lpips_net: Annotated[str, typer.Option("--lpips-net", help="vgg or alex.")] = "vgg",
    perceptual_weight: Annotated[float, typer.Option("--perceptual-weight", help="Weight of the LPIPS loss.")] = 1.0,
    align_teacher: Annotated[
        Path | None,
        typer.Option(
            "--align-teacher",
            help="Local V-JEPA2 model directory (transformers format): adds the feature-alignment loss.",
        ),
    ] = None,
    disc_teacher: Annotated[
        Path | None,
        typer.Option(
            "--disc-teacher",
            help="Local VideoMAE model directory (transformers format): adds the semantic discriminator.",
        ),
    ] = None,
    align_weight: Annotated[
        float, typer.Option("--align-weight", help="Weight of the alignment loss (paper: 0.7).")
    ] = 0.7,
    align_layer: Annotated[
        int | None,
        typer.Option(
            "--align-layer",
            help="Decoder layer (1-based) to align (default: the preset's middle layer).",
            show_default=False,
        ),
    ] = None,
    disc: Annotated[
        str | None,
        typer.Option(
            "--disc",
            help="patchgan, semantic or both (default: both with --disc-teacher, else patchgan).",
            show_default=False,
        ),
    ] = None,
    semantic_disc_start: Annotated[
        int, typer.Option("--semantic-disc-start", help="Step at which the semantic discriminator starts.")
    ] = 20_000,
    semantic_disc_weight: Annotated[
        float, typer.Option("--semantic-disc-weight", help="Generator weight of the semantic discriminator.")
    ] = 0.1,
    fps: Annotated[str, typer.Option("--fps", help="'native' or a target frame rate (e.g. 3 for WebVid).")] = "native",
    workers: Annotated[int, typer.Option("--workers", help="DataLoader decoding workers.")] = 2,
    checkpoint_every: CheckpointEveryOpt = 1000,
    keep_last: KeepLastOpt = 3,
    log_every: LogEveryOpt = 50,
    stop_at: StopAtOpt = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Train a proxy tokenizer (stage 1) or a final tokenizer (stage 4)."""
    from evatok_cli.models.tokenizer import TOKENIZER_PRESETS
    from evatok_cli.train.loop import ResumeError
    from evatok_cli.train.tokenizer import train_tokenizer
    from evatok_cli.video import VideoError

    if preset not in TOKENIZER_PRESETS:
        fail(f"unknown preset {preset!r} (choose from {', '.join(TOKENIZER_PRESETS)})", code=2)
    if stage not in ("proxy", "final"):
        fail(f"--stage must be proxy or final, got {stage!r}", code=2)
    if disc is not None and disc not in ("patchgan", "semantic", "both"):
        fail(f"--disc must be patchgan, semantic or both, got {disc!r}", code=2)
    if codebook_size is not None and codebook_size < 2:
        fail(f"--codebook-size must be >= 2, got {codebook_size}", code=2)
    if patch_depth is not None and patch_depth < 0:
        fail(f"--patch-depth must be >= 0, got {patch_depth}", code=2)
    if dec_locality_bias is not None and dec_locality_bias < 0:
        fail(f"--dec-locality-bias must be >= 0, got {dec_locality_bias}", code=2)
    if no_lpips and lpips_backbone is not None:
        fail("give --lpips-backbone or --no-lpips, not both", code=2)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        final = train_tokenizer(
            stage=stage,
            preset=preset,
            data=data,
            out=out,
            steps=steps,
            batch_size=batch_size,
            assignment=assignment,
            router=router_option(router),
            router_w_q=w_q,
            router_w_l=w_l,
            init=init,
            resume=resume,
            seed=seed,
            device=device,
            workers=workers,
            fps=fps if fps == "native" else float(fps),
            checkpoint_every=checkpoint_every,
            keep_last=keep_last,
            log_every=log_every,
            stop_at=stop_at,
            discriminator=not no_disc,
            stdin=sys.stdin if "-" in data else None,
            on_log=None if quiet else _log_line,
            lr=lr,
            warmup=warmup,
            disc_start=disc_start,
            codebook_size=codebook_size,
            patch_depth=patch_depth,
            dec_locality_bias=dec_locality_bias,
            lpips_backbone=lpips_backbone,
            lpips_heads=lpips_heads,
            lpips_net=lpips_net,
            perceptual_loss=not no_lpips,
            perceptual_weight=perceptual_weight,
            align_teacher=align_teacher,
            disc_teacher=disc_teacher,
            align_layer=align_layer,
            disc=disc,
            align_weight=align_weight,
            semantic_disc_start=semantic_disc_start,
            semantic_disc_weight=semantic_disc_weight,
        )
    except (ResumeError, VideoError, ValueError) as e:
        fail(str(e), code=1)
    if rank0 and not quiet:
        err_console.print(f"saved {final}", markup=False)


app.command("router")(_router)
app.command("gpt")(_gpt)
