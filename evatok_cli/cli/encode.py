"""``evatok encode``: pre-tokenize a video dataset into a token store (the main job).

Usage:
    evatok encode videos/ -o tokens.zarr     # the shipped demo tokenizer and router (docs/models.md)
    evatok encode videos/ -o tokens.zarr --tokenizer runs/final
    find videos -name '*.mp4' | evatok encode - -o tokens.zarr --tokenizer runs/final --assignment uniform:128
    evatok encode ucf101/ -o ucf.zarr --tokenizer runs/final --router runs/router --label-from parent-dir --json
    evatok encode videos/ -o tokens.zarr --tokenizer runs/final --router runs/reward-router --budget 600
    evatok encode k600/ -o k600-fp.zarr --tokenizer runs/final --router runs/router --router-prefix 512,128
    evatok encode videos/ -o tokens.zarr --tokenizer runs/final --target psnr=28   # constant quality
    evatok encode batch2/ -o tokens.zarr --extensions mp4,mts      # appends to a finished store
    torchrun --nproc_per_node 8 -m evatok_cli encode webvid/ -o webvid.zarr --tokenizer runs/final

Exit codes: 0 all inputs encoded; 3 finished, some inputs skipped (listed in the store and the
summary; also on a rerun, which does not retry inputs that failed before); 1 fatal error (nothing
valid, --strict failure, bad model, another process writing the store, an append with other
settings); 2 usage error. A rerun resumes; more inputs into a finished store are appended.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from evatok_cli.cli._demo import with_demo_models
from evatok_cli.cli._render import err_console, fail, failures_by_source, print_json
from evatok_cli.cli.options import ENSEMBLE_HELP, DeviceOpt, JsonOpt, QuietOpt, SeedOpt, router_option


def encode(
    inputs: Annotated[
        list[str],
        typer.Argument(help="Video files, directories, '-' (paths on stdin) or WebDataset tars.", show_default=False),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Output store (.zarr directory, or a directory of tar shards with --format wds).",
            show_default=False,
        ),
    ],
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help="Tokenizer model directory (or a training --out directory); default: the shipped demo tokenizer.",
            show_default=False,
        ),
    ] = None,
    format: Annotated[str, typer.Option("--format", help="zarr or wds.")] = "zarr",
    assignment: Annotated[
        str | None,
        typer.Option("--assignment", help="uniform:K or fixed:k1,...,kT (default: uniform at the largest level)."),
    ] = None,
    labels_store: Annotated[
        Path | None, typer.Option("--labels-store", help="Assignments from an `evatok search` labels store.")
    ] = None,
    router: Annotated[
        list[Path] | None,
        typer.Option(
            "--router",
            help="Router model directory: one predicted assignment per clip (default with the demo tokenizer and no other policy: the shipped demo router)."
            + ENSEMBLE_HELP,
        ),
    ] = None,
    w_q: Annotated[
        float | None, typer.Option("--w-q", help="Quality weight for a reward-head router (default: the router's).")
    ] = None,
    w_l: Annotated[
        float | None, typer.Option("--w-l", help="Length weight for a reward-head router (default: the router's).")
    ] = None,
    budget: Annotated[
        float | None, typer.Option("--budget", help="Mean tokens per clip over the job (reward-head router).")
    ] = None,
    router_prefix: Annotated[
        str | None,
        typer.Option(
            "--router-prefix",
            help="k1,...,kP: the router's best assignment that starts with these block lengths (frame-prediction "
            "training data for `train gpt --prefix-blocks P`; paper: 512,128).",
            show_default=False,
        ),
    ] = None,
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="Quality target instead of a router: psnr=28, ssim=0.9 or lpips=0.15 (needs --lpips-backbone). "
            "Each clip gets the fewest tokens whose reconstruction meets it, block by block (the largest level where none does).",
            show_default=False,
        ),
    ] = None,
    lpips_backbone: Annotated[
        Path | None, typer.Option("--lpips-backbone", help="torchvision vgg16/alexnet checkpoint (--target lpips=...).")
    ] = None,
    lpips_net: Annotated[str, typer.Option("--lpips-net", help="LPIPS backbone: vgg or alex.")] = "vgg",
    lpips_heads: Annotated[
        Path | None, typer.Option("--lpips-heads", help="LPIPS v0.1 heads (default: from an installed lpips package).")
    ] = None,
    clips: Annotated[
        str, typer.Option("--clips", help="Clips per video: all, first, random or N (evenly spaced).")
    ] = "all",
    fps: Annotated[str, typer.Option("--fps", help="'native' or a target frame rate.")] = "native",
    label_from: Annotated[
        str | None, typer.Option("--label-from", help="parent-dir (UCF-101 layout) or a CSV file path,label.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per tokenizer batch.")] = 8,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader decoding workers.")] = 2,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first bad input.")] = False,
    extensions: Annotated[
        str | None,
        typer.Option(
            "--extensions",
            help="Comma-separated file endings taken when walking directories, e.g. mp4,mov (default: the common video containers, docs/video.md).",
            show_default=False,
        ),
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Encode every clip of the inputs into adaptive-length tokens.

    Exit codes: 0 all inputs encoded; 3 finished, some inputs skipped (listed in the store and the
    summary); 1 fatal error; 2 usage error. Rerun the same command to resume an interrupted job.
    """
    from evatok_cli.checkpoint import CheckpointError
    from evatok_cli.encode import EncodeError, encode_videos
    from evatok_cli.store import StoreError
    from evatok_cli.video import VideoError

    if format not in ("zarr", "wds"):
        fail(f"--format must be zarr or wds, got {format!r}", code=2)
    exts = None
    if extensions is not None:
        exts = [e.strip().lower() for e in extensions.split(",") if e.strip()]
        exts = [e if e.startswith(".") else f".{e}" for e in exts]
        if not exts or any(len(e) < 2 or "/" in e for e in exts):
            fail(f"--extensions must be comma-separated file endings such as mp4,mov; got {extensions!r}", code=2)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    router = router_option(router)
    wanted: dict[str, Path | None] = {"tokenizer": tokenizer}
    if tokenizer is None and assignment is None and labels_store is None and router is None and target is None:
        wanted["router"] = None  # the demo tokenizer goes with the demo router (adaptive lengths)
    models = with_demo_models(quiet=quiet, optional=("router",), **wanted)
    tokenizer, router = models["tokenizer"], models.get("router", router)
    show = rank0 and not quiet and err_console.is_terminal
    progress = Progress(
        TextColumn("encoding"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=not show,
    )
    task = progress.add_task("encode", total=None, info="")

    def on_progress(p: dict) -> None:
        progress.update(
            task,
            completed=p.get("done", p["clips"]),
            total=p["total"],
            info=f"{p['clips_per_s']:.1f} clips/s  {p['tokens_per_s']:.0f} tok/s  "
            f"{p['mean_tokens']:.0f} tok/clip  {p['failures']} failed",
        )

    try:
        with progress:
            summary = encode_videos(
                inputs,
                out,
                tokenizer=tokenizer,
                format=format,
                assignment=assignment,
                labels_store=labels_store,
                router=router,
                w_q=w_q,
                w_l=w_l,
                budget=budget,
                router_prefix=router_prefix,
                target=target,
                metric_options={"net": lpips_net, "backbone": lpips_backbone, "heads": lpips_heads},
                clips=clips,
                fps=fps if fps == "native" else float(fps),
                label_from=label_from,
                batch_size=batch_size,
                workers=workers,
                device=device,
                seed=seed,
                strict=strict,
                stdin=sys.stdin if "-" in inputs else None,
                on_progress=on_progress,
                extensions=exts,
            )
    except (EncodeError, VideoError, StoreError, CheckpointError, ValueError) as e:
        fail(str(e), code=1)
    if not rank0:
        raise typer.Exit(summary.exit_code)
    if json_:
        print_json(summary.to_dict())
    if not quiet:
        if summary.nothing_to_do:
            err_console.print(
                f"{out}: already finished with all {summary.skipped_done} clips of these inputs that "
                "decode; nothing to do",
                markup=False,
            )
        else:
            done = (
                "appended to a finished store" if summary.appended else "already done"
            ) + f": {summary.skipped_done} clips already there"
            err_console.print(
                f"{out}: {summary.clips} clips "
                + ("added" if summary.appended else "encoded")
                + (f" ({done})" if summary.skipped_done or summary.appended else "")
                + f", {summary.failures} failed, {summary.mean_tokens:.1f} tokens/clip "
                f"({summary.saved_fraction:.1%} fewer than uniform {summary.uniform_tokens}), "
                f"{summary.wall_s:.1f}s ({summary.clips_per_s:.2f} clips/s)",
                markup=False,
            )
            broken = failures_by_source(summary.failed)  # one line per broken file (--json has every clip)
            for source, lost, reason in broken[:20]:
                err_console.print(
                    f"  {source}: {lost} clip{'s' if lost != 1 else ''} lost: {reason}", markup=False, soft_wrap=True
                )
            if len(broken) > 20:
                err_console.print(
                    f"  ... and {len(broken) - 20} more files (all in --json and in the store)", markup=False
                )
        if summary.target is not None and summary.target["clips"]:
            t = summary.target
            err_console.print(
                f"  target {t['metric']}={t['value']:g}: {t['met']} of {t['clips']} clips met it "
                f"(mean {t['metric']} {t['mean_value']:.4g}); the others got the largest level where no level met it",
                markup=False,
                soft_wrap=True,
            )
        if summary.failed_before:
            err_console.print(
                f"  {summary.failed_before} clips of inputs that failed in an earlier run were not retried "
                "(their reasons are in the store: evatok info --json)",
                markup=False,
                soft_wrap=True,
            )
        if summary.passed_over:
            err_console.print(
                f"  {summary.passed_over} files in the input directories passed over (not video extensions: "
                f"{', '.join(summary.passed_over_examples)}{', ...' if summary.passed_over > 5 else ''}); "
                "take them with --extensions",
                markup=False,
                soft_wrap=True,
            )
    raise typer.Exit(summary.exit_code)
