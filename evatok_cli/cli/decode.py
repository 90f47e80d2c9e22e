"""``evatok decode``: token store -> one mp4 per sample.

Usage:
    evatok decode tokens.zarr -o recon/ --limit 8      # the tokenizer the store records (or the demo one that wrote it)
    evatok decode tokens.zarr -o recon/ --tokenizer runs/final --limit 8
    evatok decode tokens.zarr -o recon/ --tokenizer runs/final --keys KEY1 --keys KEY2 --side-by-side
    evatok decode tokens.zarr -o recon/ --tokenizer runs/final --metrics --json
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evatok_cli.cli._demo import with_demo_models
from evatok_cli.cli._render import err_console, fail, print_json
from evatok_cli.cli.options import DeviceOpt, JsonOpt, QuietOpt


def decode(
    store: Annotated[Path, typer.Argument(help="Token store written by `evatok encode`.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the mp4 files.", show_default=False)],
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help="The tokenizer that wrote the store (default: the one it records, if unchanged;"
            " else the shipped demo tokenizer for stores it wrote).",
            show_default=False,
        ),
    ] = None,
    keys: Annotated[
        list[str] | None, typer.Option("--keys", help="Decode only these sample keys (repeatable).")
    ] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Decode only the first N samples.")] = None,
    side_by_side: Annotated[
        bool, typer.Option("--side-by-side", help="Source clip left, reconstruction right.")
    ] = False,
    metrics: Annotated[bool, typer.Option("--metrics", help="PSNR/SSIM of each clip against its source.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 8,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Decode token-store samples back to video files."""
    from evatok_cli.checkpoint import CheckpointError, TokenizerMismatchError
    from evatok_cli.decode import DecodeError, decode_store, store_tokenizer
    from evatok_cli.demo import demo_model_dir
    from evatok_cli.store import StoreError
    from evatok_cli.video import VideoError

    if keys and limit is not None:
        fail("give --keys or --limit, not both", code=2)
    demo = False
    if tokenizer is None:  # the tokenizer that wrote the store (its recorded directory, or the demo's)
        try:
            tokenizer = store_tokenizer(store)
        except (DecodeError, StoreError, CheckpointError) as e:
            fail(str(e), code=1)
        demo = tokenizer == demo_model_dir("tokenizer")
        if demo:
            with_demo_models(tokenizer=None, quiet=quiet)  # the usual one line about demo models
        elif not quiet:
            err_console.print(f"using the tokenizer that wrote {store}: {tokenizer}", markup=False, soft_wrap=True)
    try:
        summary = decode_store(
            store,
            out,
            tokenizer=tokenizer,
            keys=keys,
            limit=limit,
            side_by_side=side_by_side,
            metrics=metrics,
            batch_size=batch_size,
            device=device,
        )
    except TokenizerMismatchError as e:
        hint = "; --tokenizer was omitted, so the shipped demo tokenizer was tried: pass the tokenizer that wrote the store with --tokenizer DIR"
        fail(str(e) + (hint if demo else ""), code=1)
    except (DecodeError, StoreError, CheckpointError, VideoError, ValueError) as e:
        fail(str(e), code=1)
    if json_:
        print_json(summary.to_dict())
    elif metrics:
        for rec in summary.per_clip:
            if "psnr" in rec:
                typer.echo(f"{rec['key']}\t{rec['tokens']} tokens\tPSNR {rec['psnr']:.2f} dB\tSSIM {rec['ssim']:.4f}")
        if summary.mean_psnr is not None:
            typer.echo(f"mean\t\tPSNR {summary.mean_psnr:.2f} dB\tSSIM {summary.mean_ssim:.4f}")
    if not quiet:
        err_console.print(f"{summary.written} mp4 files in {out}", markup=False)
        for f in summary.source_failures:
            err_console.print(f"  no source for {f['key']}: {f['reason']}", markup=False)
