"""``evatok route``: choose each clip's token assignment with a trained router (stage 3).

Without ``-o`` one JSON line per clip goes to stdout (``key, source, clip_start, assignment, index,
tokens``); the summary (clips, mean tokens, budget, evaluation) goes to stderr, or with ``-o`` and
``--json`` to stdout as one JSON object. Under torchrun every rank routes its share of the videos
and rank 0 writes everything, in the order (and with the budget) of a one-process run.

Usage:
    evatok route --data videos/ > assignments.jsonl                     # the shipped demo router
    evatok route --router runs/router --data videos/ > assignments.jsonl
    evatok route --router runs/rr --data videos/ --w-q 1.6 --w-l 0.4 --clips all -o assignments.jsonl
    evatok route --router runs/rr --data videos/ --budget 512 -o assignments.jsonl     # reward head only
    evatok route --router runs/router --data videos/ --eval val_labels.zarr -o a.jsonl --json
    evatok route --router runs/rr-a --router runs/rr-b --data videos/ --budget 256 -o a.jsonl   # an ensemble
    torchrun --nproc_per_node 8 -m evatok_cli route --router runs/rr --data videos/ --budget 512 -o a.jsonl
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from evatok_cli.cli._demo import with_demo_models
from evatok_cli.cli._render import err_console, fail, print_json
from evatok_cli.cli.options import ENSEMBLE_HELP, DeviceOpt, JsonOpt, QuietOpt, router_option


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _render_summary(s: dict[str, Any]) -> None:
    line = f"routed {s['clips']} clips ({s['head']} head): mean {s['mean_tokens']:.1f} tokens"
    if s.get("budget") is not None:
        line += f" (budget {s['budget']:g}, lambda {s['lambda']:.4g})"
    elif s["head"] == "reward":
        line += f" (w_q {s['w_q']:g}, w_l {s['w_l']:g})"
    err_console.print(line, markup=False)
    if s["failures"]:
        err_console.print(
            f"{len(s['failures'])} clips/videos skipped; first: {s['failures'][0]['source']}: "
            f"{s['failures'][0]['reason']}",
            markup=False,
        )
    ev = s.get("eval")
    if ev:
        top5 = f", top-5 {ev['top5']:.1%}" if "top5" in ev else ""
        err_console.print(
            f"eval ({ev['clips']} clips, w_q {ev['w_q']:g}, w_l {ev['w_l']:g}): top-1 {ev['top1']:.1%}{top5}; "
            f"reward percentile P router {ev['p_router']:.1%}, best-uniform per clip {ev['p_uniform_per_clip']:.1%}, "
            f"best single uniform {tuple(ev['uniform_global'])} {ev['p_uniform_global']:.1%}; mean tokens router "
            f"{ev['mean_tokens_router']:.1f}, best {ev['mean_tokens_best']:.1f}",
            markup=False,
        )


def route(
    data: Annotated[
        list[str],
        typer.Option(
            "--data", help="Video files, directories, '-' (paths on stdin) or WebDataset tars.", show_default=False
        ),
    ],
    router: Annotated[
        list[Path] | None,
        typer.Option(
            "--router",
            help="Router model directory (or training output directory); default: the shipped demo router."
            + ENSEMBLE_HELP,
            show_default=False,
        ),
    ] = None,
    w_q: Annotated[
        float | None, typer.Option("--w-q", help="Reward head: quality weight (default: the router's labels').")
    ] = None,
    w_l: Annotated[
        float | None, typer.Option("--w-l", help="Reward head: length weight (default: the router's labels').")
    ] = None,
    budget: Annotated[
        float | None, typer.Option("--budget", help="Mean tokens per clip over the set (reward head).")
    ] = None,
    clips: Annotated[str, typer.Option("--clips", help="Clips per video: first, all or N (evenly spaced).")] = "first",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the assignments here (JSON lines).")] = None,
    eval_labels: Annotated[
        Path | None, typer.Option("--eval", help="Labels store: route its clips and score them.")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Clips per forward pass.")] = 16,
    workers: Annotated[int, typer.Option("--workers", help="DataLoader decoding workers.")] = 0,
    device: DeviceOpt = "auto",
    json_: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Choose each clip's token assignment with a router (argmax, trade-off, or token budget)."""
    from evatok_cli.checkpoint import CheckpointError
    from evatok_cli.route import route as route_clips
    from evatok_cli.store import StoreError
    from evatok_cli.video import VideoError, parse_clip_policy

    if json_ and out is None:
        fail("--json prints the summary on stdout, which holds the clip lines without -o: add -o FILE", code=2)
    if budget is not None and budget <= 0:
        fail(f"--budget must be > 0, got {budget:g}", code=2)
    if batch_size < 1:
        fail(f"--batch-size must be >= 1, got {batch_size}", code=2)
    routers = router_option(router) or with_demo_models(router=None, quiet=quiet)["router"]  # like encode
    try:
        policy = parse_clip_policy(clips)
        if policy == "random":
            raise ValueError("--clips random is not deterministic; use first, all or N")
        result = route_clips(
            routers,
            data,
            clips=policy,
            w_q=w_q,
            w_l=w_l,
            budget=budget,
            eval_labels=eval_labels,
            batch_size=batch_size,
            device=device,
            workers=workers,
            stdin=sys.stdin if "-" in data else None,
        )
    except (CheckpointError, StoreError, VideoError, ValueError) as e:
        fail(str(e), code=1)
    if not result.is_main:  # torchrun: rank 0 holds every clip's record and writes them
        return
    if out is None:
        for r in result.records:
            print_json(r)
    else:
        _write_jsonl(out, result.records)
    if json_:
        print_json(result.summary)
    elif not quiet:
        _render_summary(result.summary)
