"""The ``evatok`` command line: a Typer app whose subcommands are registered here, in one place.

Each subcommand lives in its own thin module (validate flags, call one library function, render the
result). Only subcommands that work are registered.

Usage:
    evatok --version
    evatok info VIDEO_OR_STORE... [--json]
    evatok train tokenizer --stage proxy --preset small --data videos/ --out runs/proxy
    evatok search --tokenizer runs/proxy --data videos/ -o labels.zarr
    evatok train router --labels labels.zarr --data videos/ --preset small --out runs/router
    evatok route --router runs/router --data videos/
    evatok encode videos/ -o tokens.zarr --tokenizer runs/final --router runs/router
    evatok decode tokens.zarr -o recon/ --tokenizer runs/final
    evatok train gpt --tokens tokens.zarr --preset tiny --out runs/gpt
    evatok generate --gpt runs/gpt --tokenizer runs/final --classes 0,1 -o samples/
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from evatok_cli import __version__
from evatok_cli.cli import decode as _decode
from evatok_cli.cli import encode as _encode
from evatok_cli.cli import eval as _eval
from evatok_cli.cli import generate as _generate
from evatok_cli.cli import info as _info
from evatok_cli.cli import route as _route
from evatok_cli.cli import search as _search
from evatok_cli.cli import train as _train

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
app.command(name="search")(_search.search)
app.command(name="encode")(_encode.encode)
app.command(name="decode")(_decode.decode)
app.command(name="route")(_route.route)
app.command(name="generate")(_generate.generate)
app.add_typer(_train.app, name="train")
app.add_typer(_eval.app, name="eval")


def main() -> None:
    """Console-script entry point."""
    app()
