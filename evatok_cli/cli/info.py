"""``evatok info``: what a video file or a token store holds, and which demo models are shipped.

Usage:
    evatok info clip.mp4                 # probe: frames, fps, size, duration, codec
    evatok info tokens.zarr              # store: samples, token counts, common assignments, metadata
    evatok info a.mp4 tokens.zarr --json # one JSON object per path on stdout
    evatok info --models                 # the shipped demo models and their cards (docs/models.md)
    evatok info --models --json          # {"dir": ..., "models": [...]} on one line
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from evatok_cli.cli._render import err_console, fail, print_json
from evatok_cli.cli.options import JsonOpt


def describe(path: Path) -> dict[str, Any]:
    """The info record of one path: a store's stats or a video's probe (raises on bad input)."""
    from evatok_cli.store import detect_format, open_store

    if detect_format(path) is not None:  # unfinished stores too: open_store says what is missing
        return {"path": str(path), "type": "store", **open_store(path).stats()}
    from evatok_cli.video import probe

    return {"path": str(path), "type": "video", **probe(path).to_dict()}


def _metadata_lines(meta: dict[str, Any]) -> str:
    """The store attrs in a few readable lines (``--json`` has them whole)."""
    lines = []
    tok = meta.get("tokenizer", {})
    if tok:
        lines.append(f"tokenizer: preset {tok.get('preset') or '?'}, weights sha256 {str(tok.get('sha256', ''))[:12]}")
    for key in ("space", "clip"):
        if key in meta:
            lines.append(f"{key}: " + ", ".join(f"{k} {v}" for k, v in meta[key].items()))
    for k, v in meta.items():
        if k in ("tokenizer", "space", "clip", "evatok_format"):
            continue
        if k == "labels" and isinstance(v, list):
            v = f"{len(v)} classes ({', '.join(map(str, v[:5]))}{', ...' if len(v) > 5 else ''})"
        lines.append(f"{k}: {v}")
    return "\n".join(lines)


def _emit(title: str, rows: list[tuple[str, str]], console: Console, fold: bool = False) -> None:
    """A titled two-column table on a terminal; plain ``key: value`` lines otherwise (pipes, files:
    nothing wrapped at the width rich guesses), continuation lines indented."""
    if not console.is_terminal:
        lines = [title]
        for k, v in rows:
            first, *rest = str(v).split("\n") or [""]
            lines.append(f"  {k}: {first}")
            lines += [f"    {x}" for x in rest]
        typer.echo("\n".join(lines))
        return
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold" if fold else "ellipsis")
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


def _render(rec: dict[str, Any], console: Console) -> None:
    rows: list[tuple[str, str]] = []
    for k, v in rec.items():
        if k in ("path", "type"):
            continue
        if k == "top_assignments":
            v = "\n".join(f"{tuple(a)}  x{n}" for a, n in v)
        elif k == "metadata":
            v = _metadata_lines(v)
        elif isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (list, tuple)) and v and isinstance(v[0], float):
            v = ", ".join(f"{x:.4g}" for x in v)
        rows.append((k, str(v)))
    _emit(f"{rec['path']} ({rec['type']})", rows, console)


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _render_models(recs: list[dict[str, Any]], root: Path, console: Console) -> None:
    for r in recs:
        rows = [
            ("preset", str(r["preset"])),
            ("parameters", f"{r['parameters'] / 1e6:.3g}M"),
            ("size", f"{_size(r['bytes'])} ({r['dtype'] or 'float32'} weights)"),
            ("sha256", r["sha256"]),
        ]
        for k, v in r["card"].items():
            rows.append((k, ", ".join(f"{a} {b}" for a, b in v.items()) if isinstance(v, dict) else str(v)))
        if not r["card"]:
            rows.append(("card", "(none)"))
        _emit(f"demo {r['kind']} ({r['path']})", rows, console, fold=True)  # a sha256 wraps rather than being cut
    line = f"{len(recs)} demo models in {root}, {_size(sum(r['bytes'] for r in recs))} in all"
    if console.is_terminal:
        console.print(line, highlight=False)
    else:
        typer.echo(line)


def _models(json_: bool, console: Console) -> None:
    from evatok_cli.checkpoint import CheckpointError
    from evatok_cli.demo import demo_models, demo_root

    root = demo_root()
    try:
        recs = demo_models()
    except CheckpointError as e:
        fail(f"a shipped demo model is broken: {e}", code=1)
    if json_:
        print_json({"dir": str(root), "models": recs})
    elif recs:
        _render_models(recs, root, console)
    if not recs:
        err_console.print(
            f"no demo models are shipped in {root} (this build has none); pass your own models with "
            "--tokenizer/--router/--gpt DIR (docs/models.md)",
            markup=False,
            soft_wrap=True,
        )


def info(
    paths: Annotated[list[Path] | None, typer.Argument(help="Video files or token stores.", show_default=False)] = None,
    models: Annotated[
        bool, typer.Option("--models", help="List the shipped demo models (kind, preset, size, sha256, card).")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Describe video files (probe), token stores (token statistics and metadata) and the demo models."""
    from evatok_cli.store import StoreError
    from evatok_cli.video import VideoError

    console = Console()
    if not paths and not models:
        fail("give video files or token stores, or --models", code=2)
    if models:
        _models(json_, console)
    failed = 0
    for path in paths or []:
        try:
            rec = describe(path)
        except (VideoError, StoreError) as e:
            err_console.print(f"evatok: error: {e}", markup=False, soft_wrap=True)
            failed += 1
            continue
        if json_:
            print_json(rec)
        else:
            _render(rec, console)
    if failed:
        raise typer.Exit(1)
