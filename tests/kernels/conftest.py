"""Kernel tests run Triton kernels in Triton's CPU interpreter when no GPU is present.

Triton picks interpreter mode when ``triton.language`` is first imported, so the variable is set here,
at collection of this folder, before any test imports triton (nothing outside ``evatok_kernels``
imports it). With CUDA present the compiled kernels are tested and nothing is changed.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
