"""The model directory format (DESIGN §5): ``config.json`` + ``model.safetensors`` (+ ``ema.safetensors``).

A directory is self-describing: ``config.json`` names the model kind, the preset, the format
version and every config field, so loading needs only the path. Model kinds map to classes through
an allow-listed registry (never a dotted path from metadata). Weights are safetensors only; nothing
is unpickled. A directory is written under a temporary name and renamed, so a crash never leaves a
half-written model behind the final name.

Every model class registers its kind here and loads through :func:`load_model`; what jobs add on
top (training output directories, ``open_model``, exports) lives in :mod:`evatok_cli.checkpoint`.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file

from evatok_cli import __version__
from evatok_cli.config import config_from_dict, config_to_dict, load_json, save_json

log = logging.getLogger(__name__)

M = TypeVar("M", bound=torch.nn.Module)

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
EMA_NAME = "ema.safetensors"

# kind -> (model class, config class); filled by each model module with `register_model_kind`.
_KINDS: dict[str, tuple[type[torch.nn.Module], type]] = {}
# The modules that register the built-in kinds, imported on first use so that loading a model needs
# no earlier import (a fixed allow-list: the module name never comes from metadata).
_BUILTIN_KIND_MODULES = {
    "tokenizer": "evatok_cli.models.tokenizer",
    "router": "evatok_cli.models.router",
    "gpt": "evatok_cli.models.gpt",
}


class CheckpointError(Exception):
    """A model directory is missing, incomplete or of the wrong kind; the message names the path."""


def register_model_kind(kind: str, config_cls: type) -> Callable[[type[torch.nn.Module]], type[torch.nn.Module]]:
    """Class decorator: make ``kind`` loadable by :func:`load_model`. The model takes ``config``."""

    def deco(model_cls: type[torch.nn.Module]) -> type[torch.nn.Module]:
        _KINDS[kind] = (model_cls, config_cls)
        model_cls.model_kind = kind  # type: ignore[attr-defined]
        return model_cls

    return deco


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; contiguous clones keep tied weights loadable.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}


def save_model(
    path: str | Path,
    model: torch.nn.Module | dict[str, torch.Tensor],
    config: Any,
    *,
    kind: str,
    preset: str | None = None,
    ema: torch.nn.Module | dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a model directory atomically and return its path (``model``: a module or its state dict)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = model if isinstance(model, dict) else _state(model)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(tmp / WEIGHTS_NAME))
    if ema is not None:
        ema_state = ema if isinstance(ema, dict) else _state(ema)
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in ema_state.items()}, str(tmp / EMA_NAME))
    meta = {
        "format_version": FORMAT_VERSION,
        "model_kind": kind,
        "preset": preset,
        "evatok_version": __version__,
        "config": config_to_dict(config),
        **(extra or {}),
    }
    save_json(tmp / CONFIG_NAME, meta)  # written last: a directory counts only once it exists
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def read_model_meta(path: str | Path) -> dict[str, Any]:
    """``config.json`` of a model directory, validated."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model directory (does not exist or is not a directory)")
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (not an evatok model directory, or an unfinished write)")
    try:
        meta = load_json(path / CONFIG_NAME)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported model format version {meta.get('format_version')!r}")
    return meta


def load_model(
    path: str | Path, *, kind: str | None = None, ema: bool = True, map_location: str | torch.device = "cpu"
) -> torch.nn.Module:
    """Load a model directory; uses EMA weights when present and ``ema`` is true."""
    path = Path(path)
    meta = read_model_meta(path)
    found = meta.get("model_kind")
    if kind is not None and found != kind:
        raise CheckpointError(f"{path}: is a {found!r} model, expected {kind!r}")
    if found not in _KINDS and found in _BUILTIN_KIND_MODULES:
        importlib.import_module(_BUILTIN_KIND_MODULES[found])
    if found not in _KINDS:
        raise CheckpointError(f"{path}: unknown model kind {found!r} (known: {', '.join(sorted(_KINDS))})")
    model_cls, config_cls = _KINDS[found]
    try:
        config = config_from_dict(config_cls, meta["config"])
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad config ({e})") from None
    model = model_cls(config)
    weights = path / (EMA_NAME if ema and (path / EMA_NAME).is_file() else WEIGHTS_NAME)
    if not weights.is_file():
        raise CheckpointError(f"{path}: missing {weights.name}")
    state = load_file(str(weights), device=str(map_location))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.preset = meta.get("preset")  # type: ignore[attr-defined]
    return model.to(map_location).eval()


def load_as(cls: type[M], path: str | Path, *, ema: bool = True, map_location: str | torch.device = "cpu") -> M:
    """:func:`load_model` for a registered class's own kind; what each model's ``from_pretrained`` calls."""
    model = load_model(path, kind=cls.model_kind, ema=ema, map_location=map_location)  # type: ignore[attr-defined]
    if not isinstance(model, cls):
        raise TypeError(f"{path}: loaded a {type(model).__name__}, expected {cls.__name__}")
    return model


def weights_sha256(path: str | Path) -> str:
    """sha256 of a model directory's ``model.safetensors`` (recorded in token stores)."""
    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS_NAME, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
