"""Resumable training checkpoints: ``OUT/step-NNNNNNNN/`` step directories.

A step directory is a model directory (DESIGN §5: ``config.json``, ``model.safetensors``,
``ema.safetensors``) with the training state beside it:

- ``train_state.pt`` — optimizers, schedulers' inputs, discriminators, EMA: tensors and plain
  containers only, loaded with ``torch.load(weights_only=True)`` (nothing is unpickled);
- ``rng-rankR.pt`` — each rank's torch/numpy/python RNG state, for exact resume;
- ``state.json`` — step and metadata, written **last**: a step directory counts only once it
  exists (torchtitan's rule). Resume picks the highest valid one; unfinished ones are removed.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evatok_cli.checkpoint import STATE_NAME, STEP_RE, latest_step_dir, resolve_model_dir, step_dir, valid_steps
from evatok_cli.config import load_json, save_json

__all__ = [
    "STATE_NAME",
    "TRAIN_STATE_NAME",
    "latest_step_dir",
    "load_rng",
    "prune",
    "read_state",
    "remove_incomplete",
    "resolve_model_dir",
    "save_rng",
    "step_dir",
    "valid_steps",
    "write_state",
]

TRAIN_STATE_NAME = "train_state.pt"


def remove_incomplete(out: Path) -> None:
    """Delete step directories without ``state.json`` (a crash mid-save)."""
    out = Path(out)
    if not out.is_dir():
        return
    for p in out.iterdir():
        if (STEP_RE.match(p.name) or p.name.endswith(".tmp")) and p.is_dir() and not (p / STATE_NAME).is_file():
            shutil.rmtree(p, ignore_errors=True)


def prune(out: Path, keep_last: int) -> None:
    """Keep only the ``keep_last`` newest complete step directories (0 = keep all)."""
    if keep_last <= 0:
        return
    for _, p in valid_steps(out)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def _np_state_to_plain(st: dict[str, Any]) -> dict[str, Any]:
    # weights_only loading accepts tensors and plain containers, not numpy arrays
    return {**st, "state": {**st["state"], "key": [int(x) for x in st["state"]["key"]]}}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _np_state_to_plain(np.random.get_state(legacy=False)),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.asarray(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(d: Path, rank: int) -> None:
    torch.save(rng_state(), Path(d) / f"rng-rank{rank}.pt")


def load_rng(d: Path, rank: int) -> None:
    p = Path(d) / f"rng-rank{rank}.pt"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no RNG state for rank {rank} (was the job run with another world size?)")
    set_rng_state(torch.load(p, weights_only=True))


def write_state(d: Path, state: dict[str, Any]) -> None:
    save_json(Path(d) / STATE_NAME, state)


def read_state(d: Path) -> dict[str, Any]:
    return load_json(Path(d) / STATE_NAME)
