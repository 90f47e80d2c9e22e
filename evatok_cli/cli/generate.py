"""``evatok generate``: sample class-conditional videos with a trained GPT (EVATok §4.1, PAPER §6).

Usage:
    evatok generate --num 2 -o samples/          # the shipped demo GPT and tokenizer (docs/models.md)
    evatok generate --gpt runs/gpt --tokenizer runs/final --classes 0,5,17 --num 4 -o samples/
    evatok generate --gpt runs/gpt --tokenizer runs/final --classes ride,talk --num 8 --cfg 3.0 -o samples/
    evatok generate --gpt runs/gpt --tokenizer runs/final --num 100 --format store --max-tokens 512 -o gen/ --json
    evatok generate --gpt runs/fp --tokenizer runs/final --prefix clip.mp4 --prefix-frames 5 --num 4 -o cont/
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from evatok_cli.cli._demo import with_demo_models
from evatok_cli.cli._render import err_console, fail, print_json
from evatok_cli.cli.options import DeviceOpt, JsonOpt, QuietOpt, SeedOpt


def generate(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Output directory (class-<name>_<i>.mp4, samples.zarr).", show_default=False),
    ],
    gpt: Annotated[
        Path | None,
        typer.Option(
            "--gpt",
            help="GPT model directory (or its training output directory); default: the shipped demo GPT.",
            show_default=False,
        ),
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            "--tokenizer",
            help="The tokenizer the GPT's token stores were written with (default: the shipped demo tokenizer).",
            show_default=False,
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="Comma-separated class ids or names ('null': unconditional); default: all.",
            show_default=False,
        ),
    ] = None,
    num: Annotated[int, typer.Option("--num", help="Samples per class.")] = 1,
    cfg: Annotated[
        float | None,
        typer.Option(
            "--cfg",
            help="Classifier-free guidance scale (default: 2.5 for tiny and gpt-b, 1.75 for larger presets; PAPER §6).",
            show_default=False,
        ),
    ] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Softmax temperature (0: greedy).")] = 1.0,
    top_k: Annotated[
        int | None, typer.Option("--top-k", help="Keep the k most likely ids.", show_default=False)
    ] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass.", show_default=False)] = None,
    max_tokens: Annotated[
        int | None, typer.Option("--max-tokens", help="Token budget per sample.", show_default=False)
    ] = None,
    format: Annotated[str, typer.Option("--format", help="mp4, store (OUT/samples.zarr) or both.")] = "mp4",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples generated together.")] = 16,
    prefix: Annotated[
        list[Path] | None,
        typer.Option(
            "--prefix",
            help="Continue this clip (repeatable): its first frames are encoded and the GPT samples the rest.",
            show_default=False,
        ),
    ] = None,
    prefix_blocks: Annotated[
        int | None,
        typer.Option(
            "--prefix-blocks", help="Blocks of the condition (default: the GPT's training, else 2).", show_default=False
        ),
    ] = None,
    prefix_frames: Annotated[
        int | None,
        typer.Option(
            "--prefix-frames",
            help="Real condition frames; the rest of the prefix blocks repeat the last (default: all; paper: 5 of 8).",
            show_default=False,
        ),
    ] = None,
    prefix_assignment: Annotated[
        str | None,
        typer.Option(
            "--prefix-assignment",
            help="Prefix block lengths: paper ((512,128) mapped to the levels), max or k1,...,kN (default: the GPT's).",
            show_default=False,
        ),
    ] = None,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="Use the raw weights instead of the EMA.")] = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Generate videos (and/or their tokens) for the given classes, or continue clips (--prefix)."""
    from evatok_cli.checkpoint import CheckpointError
    from evatok_cli.generate import FORMATS, GenerateError, generate_videos
    from evatok_cli.store import StoreError

    if format not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {format!r}", code=2)
    if num < 1 or batch_size < 1:
        fail("--num and --batch-size must be >= 1", code=2)
    if prefix is None and (prefix_blocks, prefix_frames, prefix_assignment) != (None, None, None):
        fail("--prefix-blocks, --prefix-frames and --prefix-assignment need --prefix", code=2)
    wanted = None if classes is None else [c.strip() for c in classes.split(",") if c.strip()]
    if wanted is not None and not wanted:
        fail("--classes is empty", code=2)
    demo_tok_only = tokenizer is None and gpt is not None
    models = with_demo_models(gpt=gpt, tokenizer=tokenizer, quiet=quiet)
    gpt, tokenizer = models["gpt"], models["tokenizer"]
    try:
        summary = generate_videos(
            gpt,
            out,
            tokenizer=tokenizer,
            classes=wanted,
            num=num,
            cfg_scale=cfg,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            format=format,
            batch_size=batch_size,
            device=device,
            ema=not no_ema,
            prefix=prefix or None,
            prefix_blocks=prefix_blocks,
            prefix_frames=prefix_frames,
            prefix_assignment=prefix_assignment,
        )
    except (GenerateError, CheckpointError, StoreError, ValueError) as e:
        about_tok = demo_tok_only and str(e).startswith(str(tokenizer))  # check_tokenizer's refusals name it first
        hint = " (--tokenizer was omitted, so the shipped demo tokenizer was used: pass the GPT's tokenizer with --tokenizer DIR)"
        fail(str(e) + (hint if about_tok else ""), code=1)
    if json_:
        print_json(summary.to_dict())
    if not quiet:
        where = [f"{len(summary.files)} mp4 files in {out}"] if summary.files else []
        where += [f"store {summary.store}"] if summary.store else []
        err_console.print(f"{summary.samples} samples (cfg {summary.cfg_scale:g}): {'; '.join(where)}", markup=False)
        err_console.print(
            f"tokens per sample: mean {summary.mean_tokens:.1f} (min {summary.min_tokens}, max {summary.most_tokens})",
            markup=False,
        )
        for rec in summary.per_sample[:20]:  # the first ones; --json has them all
            err_console.print(f"  {rec['name']}\t{rec['tokens']} tokens\t{tuple(rec['block_lengths'])}", markup=False)
        top = list(summary.assignments.items())[:5]
        err_console.print(
            "assignments: "
            + ", ".join(f"({a}) x{n}" for a, n in top)
            + (" ..." if len(summary.assignments) > 5 else ""),
            markup=False,
        )
