"""Options shared by several subcommands, as ``Annotated`` aliases (one definition, many commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output path.")]

# The training loop's options, shared by every `evatok train` command.
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in --out.")]
CheckpointEveryOpt = Annotated[int, typer.Option("--checkpoint-every", help="Steps between checkpoints.")]
KeepLastOpt = Annotated[int, typer.Option("--keep-last", help="Checkpoints kept (0 = all).")]
LogEveryOpt = Annotated[int, typer.Option("--log-every", help="Steps between metric lines.")]
StopAtOpt = Annotated[
    int | None,
    typer.Option("--stop-at", help="Exit after this many steps, leaving a checkpoint to --resume (time-limited jobs)."),
]

ENSEMBLE_HELP = " Repeat for an ensemble of reward-head routers of one labels setup (predicted quality averaged)."


def router_option(paths: list[Path] | None) -> Path | list[Path] | None:
    """A repeatable ``--router`` as the library takes it: None, one directory, or an ensemble's list."""
    if not paths:
        return None
    return paths[0] if len(paths) == 1 else list(paths)
