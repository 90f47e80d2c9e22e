"""evatok_kernels: GPU kernels for evatok, each with a pure-torch reference.

Installed from the repository's top-level ``kernels/`` folder under the name ``evatok_kernels`` so
that it cannot collide with other packages called ``kernels``. Importable without a GPU: every
kernel has a dispatcher that falls back to its torch reference where CUDA or Triton is missing.

- :mod:`evatok_kernels.vq`: fused nearest-code search for the vector quantizer (Triton), with
  ``nearest_code`` dispatching between it and the chunked torch search;
- :mod:`evatok_kernels.flex`: FlexAttention ``mask_mod``/``score_mod`` factories for the
  tokenizer's ragged block-causal layouts and the GPT's padded causal batches.

Submodules load lazily (``evatok_kernels.vq`` imports Triton when it is installed); see
docs/kernels.md for when each path is used.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

_LAZY = {"vq": "vq", "flex": "flex", "nearest_code": "vq", "flex_available": "flex"}


def triton_available() -> bool:
    """True when Triton is importable and a CUDA device is present (the kernels' only target)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return module if name == _LAZY[name] else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["flex", "flex_available", "nearest_code", "triton_available", "vq"]
