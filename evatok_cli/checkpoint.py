"""Model directories as the jobs use them (DESIGN §5): find, open, export.

The directory format itself (``config.json`` + ``model.safetensors`` (+ ``ema.safetensors``),
allow-listed model kinds, atomic writes) is :mod:`evatok_cli.models.modeldir`; its names are
re-exported here. This module adds what jobs share on top of it:

- :func:`resolve_model_dir`: a model directory, or a training output directory -> its latest
  complete ``step-NNNNNNNN/`` (:func:`latest_step_dir`);
- :func:`open_model`: the one way a job loads a model: the model, its directory, its
  ``config.json`` and (lazily) the sha256 of its weights, in one :class:`OpenModel`;
- :func:`store_attrs`: the token-store attributes (DESIGN §4) of tokens made by a tokenizer;
- :func:`export_model` turns a training checkpoint into a small model directory for shipping (the
  EMA weights in float16, no training state): the demo models of ``evatok_cli/demo`` are made so.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from evatok_cli.models.modeldir import (
    CONFIG_NAME,
    EMA_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    CheckpointError,
    _state,
    load_model,
    read_model_meta,
    register_model_kind,
    save_model,
    weights_sha256,
)
from evatok_cli.video import ClipSpec

__all__ = [
    "CONFIG_NAME",
    "EMA_NAME",
    "FORMAT_VERSION",
    "STATE_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "OpenModel",
    "TokenizerMismatchError",
    "export_model",
    "latest_step_dir",
    "load_model",
    "open_model",
    "read_model_meta",
    "register_model_kind",
    "resolve_model_dir",
    "save_model",
    "step_dir",
    "store_attrs",
    "valid_steps",
    "weights_sha256",
]


class TokenizerMismatchError(CheckpointError):
    """A tokenizer other than the one recorded (by a token store or a GPT): another space, codebook or weights."""


STEP_RE = re.compile(r"^step-(\d{8})$")
STATE_NAME = "state.json"  # written last into a training step directory: the step counts once it exists


# --------------------------------------------------------------------- training output dirs
def step_dir(out: Path, step: int) -> Path:
    return Path(out) / f"step-{step:08d}"


def valid_steps(out: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete step directory, ascending."""
    out = Path(out)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = STEP_RE.match(p.name)
        if m and (p / STATE_NAME).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_step_dir(out: Path) -> Path | None:
    steps = valid_steps(out)
    return steps[-1][1] if steps else None


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a training output directory -> its latest complete step."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    latest = latest_step_dir(path)
    return latest if latest is not None else path


# ------------------------------------------------------------------------------ open_model
class OpenModel:
    """A loaded model with where it came from: ``model``, ``dir``, ``meta`` (its config.json), ``sha256``."""

    def __init__(self, model: Any, dir: Path, meta: dict[str, Any]) -> None:
        self.model, self.dir, self.meta = model, dir, meta

    @cached_property
    def sha256(self) -> str:
        """sha256 of the directory's ``model.safetensors`` (read once, on first use)."""
        return weights_sha256(self.dir)

    @property
    def dirs(self) -> list[Path]:
        """The model directories behind this model: its own (an ensemble: its members')."""
        return [self.dir]

    def record(self) -> dict[str, Any]:
        """``{path, sha256, preset}``: how reports and stores name the model."""
        return {"path": str(self.dir), "sha256": self.sha256, "preset": self.meta.get("preset")}


def open_model(
    path: str | Path,
    kind: str | None = None,
    *,
    device: str | torch.device = "cpu",
    ema: bool = True,
) -> OpenModel:
    """Resolve, read and load a model directory (in eval mode) in one call.

    Args:
        path: a model directory, or a training output directory (its latest complete step).
        kind: the model kind expected (``tokenizer``, ``router``, ``gpt``), or None for any.
        device: where to put the weights.
        ema: use the EMA weights when the directory has them.

    Raises:
        CheckpointError: not a model directory, or a model of another kind.
    """
    model_dir = resolve_model_dir(path)
    meta = read_model_meta(model_dir)
    model = load_model(model_dir, kind=kind, ema=ema, map_location=device)
    return OpenModel(model.eval(), model_dir, meta)


def store_attrs(tokenizer: OpenModel, spec: ClipSpec, extra: dict[str, Any]) -> dict[str, Any]:
    """The store attributes of DESIGN §4 for tokens made by the opened ``tokenizer``."""
    model, c = tokenizer.model, tokenizer.model.config
    return {
        "tokenizer": {
            "config": tokenizer.meta["config"],
            "preset": tokenizer.meta.get("preset"),
            "sha256": tokenizer.sha256,
        },
        "space": model.space.to_dict(),
        "clip": {"frames": c.frames, "height": c.height, "width": c.width, "fps": spec.fps},
        "codebook_size": c.codebook_size,
        # where the tokenizer was, so `evatok decode` finds it without --tokenizer (not compared on append)
        "locations": {"tokenizer": str(Path(tokenizer.dir).resolve())},
        **extra,
    }


# ---------------------------------------------------------------------------------- export
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
