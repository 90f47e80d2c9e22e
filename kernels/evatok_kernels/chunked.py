"""The tiled pure-torch nearest-code search: the quantizer's path off CUDA and the kernel's fallback.

Lives here, below both its callers (``evatok_cli.models.quantizer`` and :mod:`evatok_kernels.vq`),
so that the kernels never import the models. Imports torch only (no Triton).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def nearest_code_chunked(z: Tensor, codebook: Tensor, *, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Index of, and squared euclidean distance to, the nearest codebook row for each row of ``z``.

    Distances are computed as |z|^2 - 2 z.c + |c|^2 over (chunk_size x chunk_size) tiles of (z,
    codebook), keeping a running minimum, so extra memory is O(chunk^2 + N + K). Ties are broken by
    the lowest index.

    Args:
        z: (N, D) vectors.
        codebook: (K, D) codes.
        chunk_size: tile side.

    Returns:
        ``(indices, min_dist)``: (N,) int64 and (N,) squared distances (clamped at 0).
    """
    if z.dim() != 2 or codebook.dim() != 2 or z.shape[1] != codebook.shape[1]:
        raise ValueError(f"nearest_code expects (N, D) and (K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    N, K = z.shape[0], codebook.shape[0]
    codebook = codebook.to(z.dtype)
    c_sq = (codebook * codebook).sum(1)  # (K,)
    indices = torch.zeros(N, dtype=torch.long, device=z.device)
    min_dist = torch.full((N,), float("inf"), dtype=z.dtype, device=z.device)
    for n0 in range(0, N, chunk_size):
        zc = z[n0 : n0 + chunk_size]
        z_sq = (zc * zc).sum(1, keepdim=True)  # (n, 1)
        best = torch.full((zc.shape[0],), float("inf"), dtype=z.dtype, device=z.device)
        best_i = torch.zeros(zc.shape[0], dtype=torch.long, device=z.device)
        for k0 in range(0, K, chunk_size):
            cc = codebook[k0 : k0 + chunk_size]
            d = torch.addmm(z_sq + c_sq[None, k0 : k0 + chunk_size], zc, cc.T, alpha=-2.0)  # (n, k)
            d_min, d_arg = d.min(1)  # first minimum inside the tile
            better = d_min < best  # strict: an earlier tile keeps ties
            best = torch.where(better, d_min, best)
            best_i = torch.where(better, d_arg + k0, best_i)
        indices[n0 : n0 + chunk_size] = best_i
        min_dist[n0 : n0 + chunk_size] = best.clamp_min(0)
    return indices, min_dist
