"""Model directories (DESIGN §5): ``config.json`` + ``model.safetensors`` (+ ``ema.safetensors``).

A directory is self-describing: ``config.json`` names the model kind, the preset, the format
version and every config field, so loading needs only the path. Model kinds map to classes through
an allow-listed registry (never a dotted path from metadata). Weights are safetensors only; nothing
is unpickled. A directory is written under a temporary name and renamed, so a crash never leaves a
half-written model behind the final name.

:func:`export_model` turns a training checkpoint into a small model directory for shipping (the
EMA weights in float16, no training state): the demo models of ``evatok_cli/demo`` are made so.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from evatok_cli import __version__
from evatok_cli.config import config_from_dict, config_to_dict, load_json, save_json

log = logging.getLogger(__name__)

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


def weights_sha256(path: str | Path) -> str:
    """sha256 of a model directory's ``model.safetensors`` (recorded in token stores)."""
    h = hashlib.sha256()
    with open(Path(path) / WEIGHTS_NAME, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# config.json fields written by save_model itself; an export never copies them from the source.
_RESERVED_META = ("format_version", "model_kind", "preset", "evatok_version", "config")


def export_model(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: torch.dtype = torch.float16,
    card: dict[str, Any] | None = None,
    tokenizer: str | Path | None = None,
) -> Path:
    """Write a minimal model directory for shipping: the EMA weights in ``dtype``, no training state.

    The source's ``config.json`` extra fields (a router's trained weights, a GPT's space, classes
    and tokenizer record, ...) are kept; ``card`` (what the model was trained on, its quality; any
    JSON) and ``exported_from`` (source step, its weights' sha256, dtype) are added. Float tensors
    are cast to ``dtype``, integer buffers stay as they are; :func:`load_model` copies the weights
    into the model's float32 parameters, so the exported model runs in float32 as before.

    Args:
        src: a model directory, or a training output directory (its latest complete step).
        dst: the directory to write (replaced atomically if it exists).
        dtype: a floating dtype for the float tensors (``torch.float16``, ``bfloat16``, ``float32``).
        card: the model card, stored as ``config.json["card"]``.
        tokenizer: for a model that records the tokenizer of its training data (a GPT's
            ``tokenizer.sha256``): the *exported* tokenizer directory. The record must name that
            tokenizer's source weights and is rewritten to the exported weights, so the shipped
            GPT accepts the shipped tokenizer.

    Returns:
        ``dst``.

    Raises:
        CheckpointError: a bad source, a cast that overflows ``dtype``, a tokenizer record that
            names other weights, or an export that does not load back to the source's weights.
    """
    from evatok_cli.train.checkpoints import resolve_model_dir

    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    src_dir, dst = resolve_model_dir(src), Path(dst)
    meta = read_model_meta(src_dir)
    used_ema = (src_dir / EMA_NAME).is_file()
    model = load_model(src_dir, ema=True)
    state = {}
    for k, v in _state(model).items():
        if v.is_floating_point():
            v = v.to(dtype)
            if not torch.isfinite(v).all():
                raise CheckpointError(f"{src_dir}: tensor {k} overflows {str(dtype).removeprefix('torch.')}")
        state[k] = v
    extra = {k: v for k, v in meta.items() if k not in _RESERVED_META}
    if tokenizer is not None:
        extra["tokenizer"] = _retarget_tokenizer(src_dir, extra.get("tokenizer"), Path(tokenizer))
    extra["exported_from"] = {
        "source": f"{src_dir.parent.name}/{src_dir.name}",  # no absolute path in a shipped file
        "sha256": weights_sha256(src_dir),
        "weights": "ema" if used_ema else "model",
        "dtype": str(dtype).removeprefix("torch."),
        "evatok_version": meta.get("evatok_version"),
    }
    if card is not None:
        extra["card"] = dict(card)
    save_model(dst, state, model.config, kind=meta["model_kind"], preset=meta.get("preset"), extra=extra)
    _check_export(dst, model, dtype)
    return dst


def _retarget_tokenizer(src_dir: Path, record: Any, tok_dir: Path) -> dict[str, Any]:
    """A GPT's tokenizer record, rewritten from the tokenizer's source weights to its export."""
    if not isinstance(record, dict) or not record.get("sha256"):
        raise CheckpointError(f"{src_dir}: records no tokenizer sha256 to point at the exported tokenizer {tok_dir}")
    tok_meta = read_model_meta(tok_dir)
    source_sha = (tok_meta.get("exported_from") or {}).get("sha256")
    new_sha = weights_sha256(tok_dir)
    if record["sha256"] not in (source_sha, new_sha):
        raise CheckpointError(
            f"{src_dir}: was trained on tokens of tokenizer weights {record['sha256'][:12]}, but {tok_dir} was "
            f"exported from {str(source_sha)[:12]} (export the tokenizer step that wrote its token stores)"
        )
    return {**record, "sha256": new_sha, "source_sha256": record["sha256"]}


def _check_export(dst: Path, source: torch.nn.Module, dtype: torch.dtype) -> None:
    """The export loads into float32 parameters equal to the source's up to ``dtype`` rounding."""
    loaded = load_model(dst)
    ref = source.state_dict()
    tol = max(torch.finfo(dtype).eps, 1e-7)  # relative rounding of one cast
    for k, v in loaded.state_dict().items():
        r = ref[k]
        if v.dtype != r.dtype:
            raise CheckpointError(f"{dst}: {k} loads as {v.dtype}, the source's is {r.dtype}")
        if v.is_floating_point() and not torch.allclose(v, r, rtol=tol, atol=float(torch.finfo(dtype).tiny) * 2):
            raise CheckpointError(f"{dst}: {k} differs from the source by more than {dtype} rounding")
        if not v.is_floating_point() and not torch.equal(v, r):
            raise CheckpointError(f"{dst}: integer tensor {k} changed in the export")
