"""``evatok info``: what a video file or a token store holds.

Usage:
    evatok info clip.mp4                 # probe: frames, fps, size, duration, codec
    evatok info tokens.zarr              # store: samples, token counts, common assignments, metadata
    evatok info a.mp4 tokens.zarr --json # one JSON object per path on stdout
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from evatok_cli.cli._render import err_console, print_json
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


def _render(rec: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{rec['path']} ({rec['type']})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
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
        table.add_row(k, str(v))
    console.print(table)


def info(
    paths: Annotated[list[Path], typer.Argument(help="Video files or token stores.", show_default=False)],
    json_: JsonOpt = False,
) -> None:
    """Describe video files (probe) and token stores (token statistics and metadata)."""
    from evatok_cli.store import StoreError
    from evatok_cli.video import VideoError

    console = Console()
    failed = 0
    for path in paths:
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
