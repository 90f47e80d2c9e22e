"""Omitted model options fall back to the shipped demo models (docs/models.md), in one place.

Usage in a subcommand (``None`` = the option was omitted)::

    models = with_demo_models(tokenizer=tokenizer, gpt=gpt, quiet=quiet)
    tokenizer, gpt = models["tokenizer"], models["gpt"]
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

from evatok_cli.cli._render import err_console, fail


def with_demo_models(
    *, quiet: bool = False, optional: Collection[str] = (), **models: Path | None
) -> dict[str, Path | None]:
    """Replace each omitted (``None``) model option by the shipped demo model of that kind.

    Prints one line on stderr naming the demo models used (rank 0, unless ``quiet``). A demo model
    that is not shipped ends the command with a one-line error naming the path and the option,
    except for the kinds in ``optional``, which then stay ``None`` (the line says so).

    Args:
        models: kind (``tokenizer``, ``router``, ``gpt``) -> the option's value.
        optional: kinds that may stay ``None`` when no demo model is shipped.
    """
    from evatok_cli.demo import OPTIONS, DemoModelError, demo_model_dir, demo_root, is_shipped

    out: dict[str, Path | None] = dict(models)
    used, missing = [], []
    for kind, given in models.items():
        if given is not None:
            continue
        if kind in optional and not is_shipped(kind):
            missing.append(kind)
            continue
        try:
            out[kind] = demo_model_dir(kind)
        except DemoModelError as e:
            fail(str(e), code=1)
        used.append(kind)
    if used and not quiet and int(os.environ.get("RANK", "0")) == 0:
        flags = "/".join(OPTIONS[k] for k in used)
        line = (
            f"using the shipped demo {' and '.join(used)} ({demo_root()}; demo quality, see docs/models.md); "
            f"pass {flags} DIR for your own"
        )
        if missing:
            line += f"; no demo {' or '.join(missing)} is shipped, so none is used"
        err_console.print(line, markup=False, soft_wrap=True)
    return out
