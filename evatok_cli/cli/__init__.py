"""The ``evatok`` command line: a Typer app whose subcommands are registered here, in one place.

Each subcommand lives in its own thin module (validate flags, call one library function, render the
result). Only subcommands that work are registered.

Usage:
    evatok --version
    evatok info VIDEO_OR_STORE... [--json]
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from evatok_cli import __version__
from evatok_cli.cli import info as _info

app = typer.Typer(
    name="evatok",
    help="Adaptive-length video tokenization (EVATok) for autoregressive video generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"evatok {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages to stderr.")] = False,
) -> None:
    """evatok: compress video datasets into adaptive-length token sequences (EVATok)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


app.command(name="info")(_info.info)


def main() -> None:
    """Console-script entry point."""
    app()
