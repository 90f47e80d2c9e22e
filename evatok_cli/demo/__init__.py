"""The demo models shipped inside the package: a tokenizer, a router and a GPT (docs/models.md).

They are small model directories (``config.json`` + ``model.safetensors``, float16 weights, made by
:func:`evatok_cli.checkpoint.export_model`) under ``evatok_cli/demo/models/{tokenizer,router,gpt}/``,
and the CLI uses them when ``--tokenizer`` / ``--router`` / ``--gpt`` are omitted, so that
``evatok encode videos/ -o tokens.zarr`` works right after ``pip install``. They are demos:
real use means training on your own data or passing your own model directories.

Each shipped ``config.json`` may carry a model card (``"card"``: trained_on, resolution, steps,
quality, ...). The environment variable ``EVATOK_DEMO_MODELS=DIR`` replaces the package's
directory by ``DIR`` (holding ``tokenizer/``, ``router/``, ``gpt/``): tests point it at models
they export themselves, and a site can point it at its own defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evatok_cli.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_model,
    read_model_meta,
    weights_sha256,
)

ENV_VAR = "EVATOK_DEMO_MODELS"
KINDS = ("tokenizer", "router", "gpt")
OPTIONS = {"tokenizer": "--tokenizer", "router": "--router", "gpt": "--gpt"}
"""The CLI option that passes your own model of each kind."""


class DemoModelError(CheckpointError):
    """A demo model is not shipped (or not usable); the message names the path and the option."""


def demo_root() -> Path:
    """The directory holding the demo model directories: ``$EVATOK_DEMO_MODELS`` or the package's."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path(__file__).resolve().parent / "models"


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown demo model kind {kind!r} (known: {', '.join(KINDS)})")


def is_shipped(kind: str) -> bool:
    """Whether a demo model of ``kind`` is present (its ``config.json`` and weights exist)."""
    _check_kind(kind)
    d = demo_root() / kind
    return (d / CONFIG_NAME).is_file() and (d / WEIGHTS_NAME).is_file()


def demo_model_dir(kind: str) -> Path:
    """The shipped demo model directory of ``kind`` (``tokenizer``, ``router`` or ``gpt``).

    Raises:
        DemoModelError: no such model is shipped (one line naming the path and the option to use).
    """
    _check_kind(kind)
    d = demo_root() / kind
    if not is_shipped(kind):
        where = f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) else ""
        raise DemoModelError(
            f"no demo {kind} is shipped: {d}{where} holds no model; pass your own with {OPTIONS[kind]} DIR "
            f"(a model directory or a training --out directory; docs/models.md)"
        )
    return d


def describe_model(path: str | Path, kind: str | None = None) -> dict[str, Any]:
    """A model directory's card: kind, preset, parameters, bytes on disk, weights sha256, card fields.

    Loads the model once to count its parameters (buffers such as a codebook are not parameters).
    """
    path = Path(path)
    meta = read_model_meta(path)
    if kind is not None and meta.get("model_kind") != kind:
        raise DemoModelError(f"{path}: is a {meta.get('model_kind')!r} model, expected {kind!r}")
    model = load_model(path)
    exported = meta.get("exported_from") or {}
    return {
        "kind": meta.get("model_kind"),
        "path": str(path),
        "preset": meta.get("preset"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "bytes": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "sha256": weights_sha256(path),
        "dtype": exported.get("dtype"),
        "evatok_version": meta.get("evatok_version"),
        "card": dict(meta.get("card") or {}),
    }


def demo_models() -> list[dict[str, Any]]:
    """:func:`describe_model` of every shipped demo model, in the order tokenizer, router, gpt."""
    return [describe_model(demo_model_dir(k), k) for k in KINDS if is_shipped(k)]


__all__ = [
    "ENV_VAR",
    "KINDS",
    "OPTIONS",
    "DemoModelError",
    "demo_model_dir",
    "demo_models",
    "demo_root",
    "describe_model",
    "is_shipped",
]
