"""``evatok eval``: reconstruction and generation metrics under named protocols (PAPER §7).

Usage:
    evatok eval recon --data videos/ --num-clips 8     # the shipped demo tokenizer (docs/models.md)
    evatok eval recon --tokenizer runs/final --data ucf101/train --protocol ucf-rfvd \\
        --i3d weights/i3d_torchscript.pt --lpips-weights weights/vgg16-397923af.pth --lpips-heads weights/vgg.pth \\
        --router runs/router -o reports/rfvd.json
    evatok eval gen --gpt runs/gpt --tokenizer runs/final --real ucf101/train --protocol ucf-c2v-10k \\
        --i3d weights/i3d_torchscript.pt -o reports/gfvd.json
    torchrun --nproc_per_node 8 -m evatok_cli eval gen --gpt runs/gpt --tokenizer runs/final --real ucf101/train \\
        --protocol ucf-c2v-10k --i3d weights/i3d_torchscript.pt -o reports/gfvd.json
    evatok eval gen --gpt runs/fp --tokenizer runs/final --real k600_val/ --protocol k600-fp-50k \\
        --i3d weights/i3d_torchscript.pt -o reports/k600-fp.json     # frame prediction (continuation)
    evatok eval curve --tokenizer runs/proxy --data ucf101/train --router runs/rr --w-q 0.8,1.2,1.6 \\
        --metric psnr -o curve.json --plot curve.png
    evatok eval compare reports/uniform.json reports/router.json

``-o report.json`` writes ``report.json`` (every field) and ``report.md`` (the table printed).
``--i3d random:SEED`` / ``--lpips-weights random:SEED`` use seeded random networks: tests only,
and the report says so. Exit codes: 0 done; 1 error (or reports that cannot be compared); 2 usage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from evatok_cli.cli._demo import with_demo_models
from evatok_cli.cli._render import err_console, fail, print_json
from evatok_cli.cli.options import ENSEMBLE_HELP, DeviceOpt, JsonOpt, QuietOpt, router_option

app = typer.Typer(
    help="Evaluate tokenizers and generators under named protocols (rFVD, gFVD, PSNR, SSIM, LPIPS).",
    no_args_is_help=True,
)

DataOpt = Annotated[
    list[str],
    typer.Option(
        "--data",
        help="Videos (files, directories, '-' for stdin, tars); repeat the option for more.",
        show_default=False,
    ),
]
TokenizerOpt = Annotated[
    Path,
    typer.Option(
        "--tokenizer", help="Tokenizer model directory (or its training output directory).", show_default=False
    ),
]
ProtocolOpt = Annotated[
    str | None,
    typer.Option(
        "--protocol",
        help="ucf-rfvd, ucf-c2v-10k, k600-fp-50k, fvd2048-16f or tiny (see docs/evaluation.md).",
        show_default=False,
    ),
]
I3DOpt = Annotated[
    str | None,
    typer.Option(
        "--i3d",
        help="I3D weights (i3d_torchscript.pt / i3d_pretrained_400.pt); random:SEED for tests only.",
        show_default=False,
    ),
]
I3DVariantOpt = Annotated[
    str | None,
    typer.Option("--i3d-variant", help="styleganv or videogpt (default: the protocol's).", show_default=False),
]
LpipsOpt = Annotated[
    str | None,
    typer.Option(
        "--lpips-weights",
        help="LPIPS backbone (vgg16-397923af.pth / alexnet-owt-7be5be79.pth); random:SEED for tests only.",
        show_default=False,
    ),
]
LpipsHeadsOpt = Annotated[
    str | None,
    typer.Option(
        "--lpips-heads",
        help="LPIPS v0.1 heads (vgg.pth / alex.pth); default: from an installed lpips package.",
        show_default=False,
    ),
]
LpipsNetOpt = Annotated[str, typer.Option("--lpips-net", help="vgg or alex.")]
NumClipsOpt = Annotated[
    int | None,
    typer.Option(
        "--num-clips",
        help="A seeded random subset of N clips (smoke runs; the report is marked non-standard).",
        show_default=False,
    ),
]
ClipsOpt = Annotated[
    str | None,
    typer.Option(
        "--clips",
        help="Override clips per video: first, all, random or N (non-standard under a protocol).",
        show_default=False,
    ),
]
ReportOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Write the report: PATH (JSON) and PATH with .md.", show_default=False),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Clips (or samples) per batch.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="DataLoader decoding workers.")]


def _split(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def _errors() -> tuple[type[BaseException], ...]:
    from evatok_cli.checkpoint import CheckpointError
    from evatok_cli.evaluation import EvalError
    from evatok_cli.video import VideoError

    return (EvalError, CheckpointError, VideoError, ValueError, FileNotFoundError, KeyError)


def _emit(report, out: Path | None, json_: bool, quiet: bool, plot: Path | None = None) -> None:
    """Rank 0 prints the markdown (or JSON) and writes the files; other ranks stay silent."""
    from evatok_cli.evaluation import plot_curve, render_markdown, write_report

    if int(os.environ.get("RANK", "0")) != 0:
        return
    if out is not None:
        paths = write_report(report, out)
        if not quiet:
            err_console.print(f"wrote {paths[0]} and {paths[1]}", markup=False)
    if plot is not None:
        plot_curve(report, plot)
        if not quiet:
            err_console.print(f"wrote {plot}", markup=False)
    if json_:
        print_json(report.to_dict())
    elif not quiet:
        typer.echo(render_markdown(report))


@app.command("recon")
def recon(
    data: DataOpt,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help="Tokenizer model directory (or its training output directory); default: the shipped demo tokenizer.",
            show_default=False,
        ),
    ] = None,
    router: Annotated[
        list[Path] | None,
        typer.Option(
            "--router",
            help="Router model directory: each clip gets the router's assignment." + ENSEMBLE_HELP,
            show_default=False,
        ),
    ] = None,
    assignment: Annotated[
        str | None,
        typer.Option(
            "--assignment",
            help="uniform:K or fixed:k1,...,kT (default: uniform at the largest level).",
            show_default=False,
        ),
    ] = None,
    w_q: Annotated[
        float | None,
        typer.Option("--w-q", help="Reward-head router: quality weight (default: the router's).", show_default=False),
    ] = None,
    w_l: Annotated[
        float | None,
        typer.Option("--w-l", help="Reward-head router: length weight (default: the router's).", show_default=False),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            help="Comma-separated: psnr,ssim,lpips,fvd (default: psnr,ssim + lpips/fvd when their weights are given).",
            show_default=False,
        ),
    ] = None,
    i3d: I3DOpt = None,
    i3d_variant: I3DVariantOpt = None,
    lpips_weights: LpipsOpt = None,
    lpips_heads: LpipsHeadsOpt = None,
    lpips_net: LpipsNetOpt = "vgg",
    protocol: ProtocolOpt = None,
    num_clips: NumClipsOpt = None,
    clips: ClipsOpt = None,
    out: ReportOpt = None,
    save_stats: Annotated[
        Path | None,
        typer.Option(
            "--save-stats", help="Also write the real/recon FVD statistics to this directory.", show_default=False
        ),
    ] = None,
    batch_size: BatchOpt = 8,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Reconstruction metrics (PSNR, SSIM, LPIPS, rFVD) and token counts of a tokenizer."""
    import sys

    from evatok_cli.evaluation import evaluate_reconstruction

    if assignment is not None and router is not None:
        fail("give either --assignment or --router, not both", code=2)
    if batch_size < 1 or workers < 0 or (num_clips is not None and num_clips < 1):
        fail("--batch-size and --num-clips must be >= 1, --workers >= 0", code=2)
    tokenizer = with_demo_models(tokenizer=tokenizer, quiet=quiet)["tokenizer"]
    try:
        report = evaluate_reconstruction(
            tokenizer,
            data,
            protocol=protocol,
            assignment=assignment,
            router=router_option(router),
            w_q=w_q,
            w_l=w_l,
            metrics=_split(metrics),
            i3d=i3d,
            i3d_variant=i3d_variant,
            lpips_weights=lpips_weights,
            lpips_heads=lpips_heads,
            lpips_net=lpips_net,
            num_clips=num_clips,
            clips=clips,
            batch_size=batch_size,
            workers=workers,
            device=device,
            stats_dir=save_stats,
            stdin=sys.stdin if "-" in data else None,
        )
        _emit(report, out, json_, quiet)
    except _errors() as e:
        fail(str(e).strip("'\""), code=1)


@app.command("gen")
def gen(
    gpt: Annotated[
        Path, typer.Option("--gpt", help="GPT model directory (or its training output directory).", show_default=False)
    ],
    tokenizer: TokenizerOpt,
    real: Annotated[
        list[str],
        typer.Option("--real", help="Real videos of the protocol's split; repeat for more.", show_default=False),
    ],
    protocol: Annotated[
        str,
        typer.Option(
            "--protocol",
            help="ucf-c2v-10k, k600-fp-50k (frame prediction), fvd2048-16f, tiny or tiny-fp.",
            show_default=False,
        ),
    ],
    i3d: Annotated[
        str,
        typer.Option(
            "--i3d",
            help="I3D weights (i3d_torchscript.pt / i3d_pretrained_400.pt); random:SEED for tests only.",
            show_default=False,
        ),
    ],
    i3d_variant: I3DVariantOpt = None,
    num_samples: Annotated[
        int | None,
        typer.Option("--num-samples", help="Generated samples (default: the protocol's).", show_default=False),
    ] = None,
    num_clips: NumClipsOpt = None,
    cfg: Annotated[
        float | None,
        typer.Option(
            "--cfg",
            help="Classifier-free guidance (default: 2.5 for tiny/gpt-b, 1.75 larger; PAPER §6).",
            show_default=False,
        ),
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature.")] = 1.0,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="Keep the k most likely ids.", show_default=False)
    ] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.", show_default=False)] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir", help="Real-statistics cache (default: ~/.cache/evatok/fvd-stats).", show_default=False
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute the real statistics and do not cache them.")
    ] = False,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the GPT's raw weights instead of the EMA.")] = False,
    prefix_assignment: Annotated[
        str | None,
        typer.Option(
            "--prefix-assignment",
            help="Frame prediction: prefix block lengths (paper, max or k1,...,kN; default: the GPT's).",
            show_default=False,
        ),
    ] = None,
    out: ReportOpt = None,
    batch_size: BatchOpt = 16,
    workers: WorkersOpt = 0,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Sampler seed (default: the protocol's).", show_default=False)
    ] = None,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """gFVD of class-conditional samples, or of continued real clips (frame prediction), against real clips."""
    import sys

    from evatok_cli.evaluation import evaluate_generation

    if (
        batch_size < 1
        or workers < 0
        or (num_samples is not None and num_samples < 1)
        or (num_clips is not None and num_clips < 1)
    ):
        fail("--batch-size, --num-samples and --num-clips must be >= 1, --workers >= 0", code=2)
    try:
        report = evaluate_generation(
            gpt,
            tokenizer,
            real,
            protocol=protocol,
            i3d=i3d,
            i3d_variant=i3d_variant,
            num_samples=num_samples,
            num_clips=num_clips,
            cfg_scale=cfg,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            workers=workers,
            device=device,
            ema=not no_ema,
            cache_dir=cache_dir,
            use_cache=not no_cache,
            prefix_assignment_spec=prefix_assignment,
            stdin=sys.stdin if "-" in real else None,
        )
        _emit(report, out, json_, quiet)
    except _errors() as e:
        fail(str(e).strip("'\""), code=1)


@app.command("curve")
def curve(
    tokenizer: TokenizerOpt,
    data: DataOpt,
    router: Annotated[
        list[Path] | None,
        typer.Option(
            "--router", help="Router model directory (adds router points)." + ENSEMBLE_HELP, show_default=False
        ),
    ] = None,
    w_q: Annotated[
        str | None,
        typer.Option(
            "--w-q",
            help="Reward head: comma-separated w_q values, w_l = 2 - w_q (default 0.8,1.2,1.6).",
            show_default=False,
        ),
    ] = None,
    budgets: Annotated[
        str | None,
        typer.Option(
            "--budgets", help="Reward head: comma-separated mean-token budgets instead of --w-q.", show_default=False
        ),
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            "--targets",
            help="Threshold points (the paper's Fig. 5 baseline): comma-separated values of the first --metric; "
            "each clip gets the fewest tokens that meet the value block by block (as encode --target).",
            show_default=False,
        ),
    ] = None,
    metric: Annotated[
        str,
        typer.Option(
            "--metric", help="Comma-separated metrics (psnr, ssim, lpips, fvd); the first drives the savings."
        ),
    ] = "psnr",
    i3d: I3DOpt = None,
    i3d_variant: I3DVariantOpt = None,
    lpips_weights: LpipsOpt = None,
    lpips_heads: LpipsHeadsOpt = None,
    lpips_net: LpipsNetOpt = "vgg",
    protocol: ProtocolOpt = None,
    num_clips: NumClipsOpt = None,
    clips: ClipsOpt = None,
    out: ReportOpt = None,
    plot: Annotated[
        Path | None,
        typer.Option("--plot", help="Also draw the curve to this PNG (needs matplotlib).", show_default=False),
    ] = None,
    batch_size: BatchOpt = 8,
    workers: WorkersOpt = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Quality vs mean tokens for every uniform level, a router and quality targets (PAPER Fig. 4, 5)."""
    import sys

    from evatok_cli.evaluation import evaluate_curve, matplotlib_available

    if plot is not None and not matplotlib_available():
        fail(
            "--plot needs matplotlib: pip install 'evatok[plot]' (or pip install matplotlib); "
            "or drop --plot (JSON and markdown need nothing)",
            code=2,
        )
    if w_q is not None and budgets is not None:
        fail("give either --w-q or --budgets, not both", code=2)
    if batch_size < 1 or workers < 0 or (num_clips is not None and num_clips < 1):
        fail("--batch-size and --num-clips must be >= 1, --workers >= 0", code=2)
    try:
        report = evaluate_curve(
            tokenizer,
            data,
            router=router_option(router),
            w_q=w_q,
            budgets=budgets,
            targets=targets,
            metrics=_split(metric),
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
            device=device,
            stdin=sys.stdin if "-" in data else None,
        )
        _emit(report, out, json_, quiet, plot)
    except _errors() as e:
        fail(str(e).strip("'\""), code=1)


@app.command("compare")
def compare(
    a: Annotated[Path, typer.Argument(help="First report (JSON written by evatok eval -o).", show_default=False)],
    b: Annotated[Path, typer.Argument(help="Second report.", show_default=False)],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write the table (markdown) here.", show_default=False)
    ] = None,
) -> None:
    """Two reports side by side; refuses reports of different protocols or metric weights."""
    from evatok_cli.evaluation import EvalError, compare_reports, load_report

    try:
        names = (a.stem, b.stem) if a.stem != b.stem else (str(a), str(b))
        table = compare_reports(load_report(a), load_report(b), names=names)
    except (EvalError, ValueError, FileNotFoundError) as e:
        fail(str(e), code=1)
    if out is not None:
        out.write_text(table)
    typer.echo(table)


__all__ = ["app"]
