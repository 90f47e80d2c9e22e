"""Fused nearest-code search for the vector quantizer (EVATok §3.1: l2-normalised 8-dim codes).

For N tokens and a codebook of K codes of D dims, the quantizer needs, for every token, the index of
the nearest code and its squared distance. Materialising the (N, K) distance matrix costs N*K*4
bytes (100k tokens x 16384 codes = 6.5 GB), so this module offers three implementations:

- :func:`nearest_code_reference`: naive ``cdist + argmin`` over the full (N, K) matrix (tests only);
- :func:`nearest_code_chunked`: the quantizer's tiled torch search (:mod:`evatok_kernels.chunked`),
  extra memory O(chunk^2 + N + K), any device;
- :func:`nearest_code_triton`: one Triton kernel; each program owns ``block_n`` tokens and walks its
  range of codes in ``block_k`` tiles, keeping a running (min distance, argmin) in registers, so the
  only extra memory is O(N * splits + (N + K) * D). Distances are computed as sum_d (z_d - c_d)^2
  in float32 (exact differences, no |z|^2 - 2 z.c + |c|^2 cancellation; 2 D flops per pair, cheap
  at D = 8).

:func:`nearest_code` dispatches: Triton when the inputs are on CUDA and Triton is importable, the
chunked torch search otherwise (and for float64 inputs, which the float32 kernel would round).
``EVATOK_VQ_KERNEL=torch`` forces the torch search, ``triton`` requires the kernel (an error where
it cannot run), ``auto`` (default) picks as above.

Ties go to the lowest code index everywhere: inside a tile the kernel takes the smallest index among
equal minima, tiles are merged in increasing code order with a strict ``<``, and so are the K-splits.
All functions are forward-only (``torch.no_grad``); the quantizer's gradient is straight-through.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from evatok_kernels import triton_available
from evatok_kernels.chunked import nearest_code_chunked

try:  # the kernel body refers to `tl` as a module global; the module stays importable without Triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    tl = None

_ENV = "EVATOK_VQ_KERNEL"
_MODES = ("auto", "torch", "triton")


def _check(z: Tensor, codebook: Tensor) -> None:
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code expects (N, D) and (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if codebook.shape[0] < 1:
        raise ValueError("nearest_code needs a codebook with at least one code")
    if z.device != codebook.device:
        raise ValueError(f"z is on {z.device} but the codebook on {codebook.device}")


# ------------------------------------------------------------------------------ references
@torch.no_grad()
def nearest_code_reference(z: Tensor, codebook: Tensor) -> tuple[Tensor, Tensor]:
    """Naive search over the full (N, K) distance matrix: ``cdist`` then ``argmin`` (tests only).

    Distances are exact differences (``compute_mode="donot_use_mm_for_euclid_dist"``), computed in
    float32 like the kernel; ``argmin`` returns the first minimum, i.e. the lowest index on ties.

    Returns:
        ``(indices, min_dist)``: (N,) int64 and (N,) squared distances in ``z.dtype``.
    """
    _check(z, codebook)
    d = torch.cdist(z.float(), codebook.float(), compute_mode="donot_use_mm_for_euclid_dist").square()  # (N, K)
    idx = d.argmin(1)
    return idx, d.gather(1, idx[:, None])[:, 0].to(z.dtype)


# ---------------------------------------------------------------------------------- kernel
def _nearest_code_kernel(
    zt_ptr,  # (D, N) float32, contiguous: token coordinates, one row per dimension
    ct_ptr,  # (D, K) float32, contiguous: code coordinates
    dist_ptr,  # (S, N) float32 out: min squared distance of each token within each split
    idx_ptr,  # (S, N) int32 out: its code index (lowest among equal minima)
    N,
    K,
    k_per_split,  # codes per split (a multiple of BLOCK_K)
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    k_lo = split * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_i = tl.zeros((BLOCK_N,), tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d in tl.static_range(D):
            zd = tl.load(zt_ptr + d * N + offs_n, mask=n_ok, other=0.0)  # (BLOCK_N,)
            cd = tl.load(ct_ptr + d * K + offs_k, mask=k_ok, other=0.0)  # (BLOCK_K,)
            diff = zd[:, None] - cd[None, :]
            acc += diff * diff
        acc = tl.where(k_ok[None, :], acc, float("inf"))
        tile_min = tl.min(acc, axis=1)  # (BLOCK_N,)
        # Lowest index among the tile's equal minima (= tl.argmin with tie_break_left, spelled out).
        cand = tl.where(acc == tile_min[:, None], offs_k[None, :], 2147483647)
        tile_arg = tl.min(cand, axis=1)
        better = tile_min < best  # strict: an earlier tile keeps ties
        best = tl.where(better, tile_min, best)
        best_i = tl.where(better, tile_arg, best_i)
    tl.store(dist_ptr + split * N + offs_n, best, mask=n_ok)
    tl.store(idx_ptr + split * N + offs_n, best_i, mask=n_ok)


if tl is not None:
    import triton

    # Decorated once at import. Triton's interpreter (CPU tensors, for tests) is chosen by
    # TRITON_INTERPRET=1, which must be set before triton is first imported: triton.language's own
    # helpers (tl.zeros, tl.min, ...) are built for one mode when triton.language is imported.
    _KERNEL: Any = triton.jit(_nearest_code_kernel)
else:  # pragma: no cover
    _KERNEL = None


def interpreter_active() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at triton's import)."""
    if tl is None:
        return False
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.zeros, JITFunction)  # an InterpretedFunction in interpreter mode


def _default_splits(n_tiles: int, k_tiles: int, device: torch.device) -> int:
    """Split the codes over programs when there are too few token tiles to fill the GPU."""
    if device.type != "cuda":
        return 1
    want = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(k_tiles, -(-want // n_tiles)))


@torch.no_grad()
def nearest_code_triton(
    z: Tensor,
    codebook: Tensor,
    *,
    block_n: int = 64,
    block_k: int = 64,
    splits: int | None = None,
    num_warps: int = 4,
) -> tuple[Tensor, Tensor]:
    """Fused nearest-code search (Triton): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.

    Args:
        z: (N, D) vectors (any float dtype; distances are computed in float32).
        codebook: (K, D) codes, on z's device.
        block_n: tokens per program (a power of two).
        block_k: codes per tile (a power of two).
        splits: number of code ranges searched by separate programs and merged afterwards
            (default: enough programs to fill the GPU; 1 on CPU).
        num_warps: warps per program (ignored by the interpreter).

    Returns:
        ``(indices, min_dist)``: (N,) int64 and (N,) squared distances in ``z.dtype``.
    """
    _check(z, codebook)
    for name, b in (("block_n", block_n), ("block_k", block_k)):
        if b < 1 or b & (b - 1):
            raise ValueError(f"{name} must be a power of two, got {b}")
    N, D = z.shape
    K = codebook.shape[0]
    if N == 0:
        return torch.zeros(0, dtype=torch.long, device=z.device), z.new_zeros(0)
    n_tiles, k_tiles = -(-N // block_n), -(-K // block_k)
    s = _default_splits(n_tiles, k_tiles, z.device) if splits is None else max(1, min(int(splits), k_tiles))
    k_per_split = -(-k_tiles // s) * block_k
    s = -(-K // k_per_split)  # drop empty splits
    zt = z.detach().t().to(torch.float32).contiguous()  # (D, N)
    ct = codebook.detach().t().to(torch.float32).contiguous()  # (D, K)
    dist = torch.empty(s, N, dtype=torch.float32, device=z.device)
    idx = torch.empty(s, N, dtype=torch.int32, device=z.device)
    if _KERNEL is None:
        raise RuntimeError("nearest_code_triton needs triton (pip install 'evatok[kernels]')")
    if z.device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            f"nearest_code_triton on {z.device} tensors needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported"
        )
    _KERNEL[(n_tiles, s)](
        zt, ct, dist, idx, N, K, k_per_split, D=D, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps
    )
    best, best_i = dist[0], idx[0]
    for j in range(1, s):  # splits cover increasing code ranges: strict < keeps the lowest index
        better = dist[j] < best
        best = torch.where(better, dist[j], best)
        best_i = torch.where(better, idx[j], best_i)
    return best_i.long(), best.to(z.dtype)


# ------------------------------------------------------------------------------ dispatcher
def vq_kernel_mode() -> str:
    """``EVATOK_VQ_KERNEL``: ``auto`` (default), ``torch`` or ``triton``."""
    mode = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{_ENV} must be one of {', '.join(_MODES)}, got {mode!r}")
    return mode


def uses_triton(z: Tensor) -> bool:
    """Whether :func:`nearest_code` runs the Triton kernel for inputs like ``z``."""
    mode = vq_kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not (z.is_cuda and triton_available()):
            raise RuntimeError(f"{_ENV}=triton needs CUDA tensors and an importable triton (z is on {z.device})")
        return True
    return z.is_cuda and z.dtype != torch.float64 and triton_available()  # the kernel computes in float32


@torch.no_grad()
def nearest_code(z: Tensor, codebook: Tensor, *, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Index of, and squared distance to, the nearest code of each row of ``z`` (ties: lowest index).

    Triton on CUDA when available (see the module docstring), else the chunked torch search with
    tiles of ``chunk_size``.

    Args:
        z: (N, D) vectors.
        codebook: (K, D) codes.
        chunk_size: tile side of the torch search (unused by the kernel).

    Returns:
        ``(indices, min_dist)``: (N,) int64 and (N,) squared distances (>= 0) in ``z.dtype``.
    """
    if uses_triton(z):
        _check(z, codebook)
        return nearest_code_triton(z, codebook)
    return nearest_code_chunked(z, codebook, chunk_size=chunk_size)


__all__ = [
    "nearest_code",
    "nearest_code_chunked",
    "nearest_code_reference",
    "nearest_code_triton",
    "interpreter_active",
    "uses_triton",
    "vq_kernel_mode",
]
