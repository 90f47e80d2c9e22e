"""Rendering helpers for the CLI: errors as one line on stderr, rich tables for humans."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console

err_console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``evatok: error: MESSAGE`` (one line) on stderr and exit with ``code``."""
    err_console.print(f"evatok: error: {message}", markup=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(obj: Any) -> None:
    """One JSON object on one line of stdout."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def failures_by_source(failed: list[dict[str, str]]) -> list[tuple[str, int, str]]:
    """Per-clip failures ``[{source, reason}]`` as one ``(source, clips lost, first reason)`` per file."""
    out: dict[str, list] = {}
    for f in failed:
        entry = out.setdefault(f["source"], [0, f["reason"]])
        entry[0] += 1
    return [(source, n, reason) for source, (n, reason) in out.items()]
