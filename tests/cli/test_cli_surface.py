"""The CLI surface is frozen: adding, removing or renaming a command or option is a deliberate act.

To change the surface on purpose, regenerate the golden file and review its diff:
    EVATOK_UPDATE_CLI_SURFACE=1 python -m pytest tests/cli/test_cli_surface.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from evatok_cli.cli import app

GOLDEN = Path(__file__).resolve().parents[1] / "assets" / "cli_surface.json"


def _surface() -> dict[str, list[str]]:
    root = typer.main.get_command(app)
    out: dict[str, list[str]] = {}

    def walk(cmd, path: str) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in sorted(subs.items()):
                walk(sub, f"{path} {name}".strip())
            return
        out[path] = sorted(
            opt for p in cmd.params for opt in (p.opts + p.secondary_opts) if opt.startswith("-")
        ) + sorted(f"<{p.name}>" for p in cmd.params if not any(o.startswith("-") for o in p.opts))

    walk(root, "")
    return out


def test_no_new_cli_options():
    surface = _surface()
    if os.environ.get("EVATOK_UPDATE_CLI_SURFACE"):
        GOLDEN.write_text(json.dumps(surface, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert surface.keys() == golden.keys(), "commands changed: update tests/assets/cli_surface.json on purpose"
    for cmd in golden:
        assert surface[cmd] == golden[cmd], (
            f"`evatok {cmd}` options changed: {sorted(set(surface[cmd]) ^ set(golden[cmd]))}"
        )
