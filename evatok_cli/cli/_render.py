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
