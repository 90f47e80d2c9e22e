"""``evatok search``: stage 2, the best assignment of every clip by the proxy reward (EVATok §3.2).

Usage:
    evatok search --tokenizer runs/proxy --data videos/ -o labels.zarr
    evatok search --tokenizer runs/proxy --data webvid.tar -o labels.zarr --metric lpips \\
        --lpips-backbone vgg16-397923af.pth --w-q 1.2 --w-l 0.8 --calibration 2000
    evatok search --tokenizer runs/proxy --data more/ -o more.zarr --stats labels.zarr   # reuse mean/std
    evatok search --tokenizer runs/proxy --data videos/ -o beam.zarr --beam 5 --json
    torchrun --nproc_per_node 8 -m evatok_cli search --tokenizer runs/proxy --data webvid/ -o labels.zarr

Exit codes: 0 done; 3 done, but this run skipped some inputs (recorded as failures in the store,
not retried by a rerun); 1 fatal error (including "no valid input"); 2 usage error. A rerun
resumes an interrupted search; a rerun of a finished one does nothing and says so (exit 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from evatok_cli.cli._render import err_console, fail, print_json
from evatok_cli.cli.options import DeviceOpt, JsonOpt, QuietOpt, SeedOpt

EXIT_SKIPPED = 3


def _progress_printer(quiet: bool) -> Any:
    if quiet:
        return None
    step = {"next": 0}

    def show(done: int, total: int) -> None:
        if done >= step["next"] or done == total:
            err_console.print(f"searched {done}/{total} clips", markup=False, highlight=False)
            step["next"] = done + max(1, total // 20)

    return show


def _render_summary(s: dict[str, Any]) -> None:
    if s["nothing_to_do"]:
        err_console.print(f"{s['out']} is already finished ({s['resumed']} clips): nothing to do", markup=False)
        return
    mode = "exact" if s["beam"] is None else f"beam {s['beam']}"
    cal = s["calibration"]
    err_console.print(
        f"searched {s['clips']} clips ({mode}) into {s['out']}"
        + (f", {s['resumed']} already done" if s["resumed"] else "")
        + f"; {s['failures']} inputs skipped\n"
        f"mean best tokens {s['mean_best_tokens']:.1f}; {s['block_evals_per_clip']:.0f} block evaluations per clip\n"
        f"wall {s['wall_s']:.1f}s (calibration {s['calibration_s']:.1f}s), {s['clips_per_s']:.2f} clips/s"
        f" on {s['world_size']} process(es)\n"
        f"calibration {cal['metric']} mean {cal['mean']:.4g} std {cal['std']:.4g} over {cal['count']} pairs",
        markup=False,
        highlight=False,
    )
    sp = s.get("spread") or {}
    if sp.get("top"):
        err_console.print(
            f"labels: {sp['distinct']} distinct assignments over {sp['clips']} clips; most common "
            f"{tuple(sp['top']['assignment'])} {sp['top']['share']:.0%}, shortest {sp['shortest_share']:.0%}, "
            f"longest {sp['longest_share']:.0%}",
            markup=False,
            highlight=False,
        )
    if sp.get("collapsed"):
        err_console.print(
            f"warning: the labels collapsed: {sp['reason']}; {sp['suggestion']}", markup=False, highlight=False
        )


def search(
    tokenizer: Annotated[
        Path,
        typer.Option("--tokenizer", help="Proxy tokenizer directory (or training output dir).", show_default=False),
    ],
    data: Annotated[
        list[str],
        typer.Option(
            "--data", help="Video files, directories, '-' (paths on stdin) or WebDataset tars.", show_default=False
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Labels store to write (resumed if unfinished).", show_default=False)
    ],
    format: Annotated[str, typer.Option("--format", help="zarr or wds.")] = "zarr",
    metric: Annotated[
        str, typer.Option("--metric", help="psnr, ssim or lpips (the paper's; needs --lpips-backbone).")
    ] = "psnr",
    lpips_net: Annotated[str, typer.Option("--lpips-net", help="LPIPS backbone: vgg or alex.")] = "vgg",
    lpips_backbone: Annotated[
        Path | None, typer.Option("--lpips-backbone", help="torchvision vgg16/alexnet checkpoint.")
    ] = None,
    lpips_heads: Annotated[
        Path | None, typer.Option("--lpips-heads", help="LPIPS v0.1 heads (default: from an installed lpips package).")
    ] = None,
    w_q: Annotated[float, typer.Option("--w-q", help="Quality weight of the reward.")] = 1.2,
    w_l: Annotated[float, typer.Option("--w-l", help="Length weight of the reward.")] = 0.8,
    calibration: Annotated[
        int, typer.Option("--calibration", help="Random (clip, assignment) pairs for the metric's mean/std.")
    ] = 2000,
    stats: Annotated[
        Path | None, typer.Option("--stats", help="Take mean/std from this JSON file or labels store instead.")
    ] = None,
    beam: Annotated[int | None, typer.Option("--beam", help="Beam width (approximate); default: exact search.")] = None,
    clips: Annotated[str, typer.Option("--clips", help="Clips per video: first, all, random or N.")] = "first",
    fps: Annotated[
        str | None, typer.Option("--fps", help="'native' or a frame rate; default: the proxy's training rate.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per search call.")] = 8,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader decoding workers.")] = 2,
    chunk: Annotated[
        int | None, typer.Option("--chunk", help="Branches per block step (default: from a memory estimate).")
    ] = None,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Label every clip with its best token assignment under the proxy reward (stage 2)."""
    from evatok_cli.checkpoint import CheckpointError
    from evatok_cli.search import search_dataset
    from evatok_cli.store import StoreError
    from evatok_cli.video import VideoError, parse_clip_policy

    if format not in ("zarr", "wds"):
        fail(f"--format must be zarr or wds, got {format!r}", code=2)
    if metric not in ("psnr", "ssim", "lpips"):
        fail(f"--metric must be psnr, ssim or lpips, got {metric!r}", code=2)
    if metric == "lpips" and lpips_backbone is None:
        fail(
            "--metric lpips needs --lpips-backbone PATH (torchvision's vgg16-397923af.pth or "
            "alexnet-owt-7be5be79.pth; weights are never downloaded)",
            code=2,
        )
    if beam is not None and beam < 1:
        fail(f"--beam must be >= 1, got {beam}", code=2)
    if stats is None and calibration < 2:
        fail(f"--calibration must be >= 2, got {calibration}", code=2)
    if batch_size < 1 or workers < 0 or (chunk is not None and chunk < 1):
        fail("--batch-size and --chunk must be >= 1, --workers >= 0", code=2)
    try:
        policy = parse_clip_policy(clips)
    except ValueError as e:
        fail(f"--clips: {e}", code=2)
    options = None
    if metric == "lpips":
        options = {"net": lpips_net, "backbone": lpips_backbone, "heads": lpips_heads}
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        summary = search_dataset(
            tokenizer,
            data,
            out,
            format=format,
            metric=metric,
            metric_options=options,
            w_q=w_q,
            w_l=w_l,
            calibration=calibration,
            stats=stats,
            beam=beam,
            clips=policy,
            fps=fps,
            batch_size=batch_size,
            workers=workers,
            chunk=chunk,
            seed=seed,
            device=device,
            stdin=sys.stdin if "-" in data else None,
            on_progress=_progress_printer(quiet or not rank0),
        )
    except (StoreError, VideoError, CheckpointError, ValueError, FileNotFoundError) as e:
        fail(str(e), code=1)
    s = summary.to_dict()
    if rank0:
        if json_:
            print_json(s)
        if not quiet:
            _render_summary(s)
    if s["failures"]:
        if rank0 and not quiet:
            for f in s["failed"][:10]:
                err_console.print(f"skipped {f['source']}: {f['reason']}", markup=False, highlight=False)
        raise typer.Exit(EXIT_SKIPPED)
