"""evatok_kernels: GPU kernels for evatok, each with a pure-torch reference.

Installed from the repository's top-level ``kernels/`` folder under the name ``evatok_kernels`` so
that it cannot collide with other packages called ``kernels``. Importable without a GPU: every
kernel has a dispatcher that falls back to its torch reference where CUDA or Triton is missing.
"""

from __future__ import annotations

import importlib.util

import torch


def triton_available() -> bool:
    """True when Triton is importable and a CUDA device is present (the kernels' only target)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


__all__ = ["triton_available"]
