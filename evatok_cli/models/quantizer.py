"""Vector quantizer with low-dimensional l2-normalised codes (EVATok §3.1, supp. K; GigaTok lineage).

The encoder's tokens are projected to ``code_dim`` (8 by default), l2-normalised and replaced by
the nearest (equally normalised) codebook entry; gradients pass straight through. Losses, all
unweighted except the commitment's beta (the training loss config weighs them):

- ``codebook``: ||q - sg(z)||^2, pulls codes towards encoder outputs;
- ``commitment``: ||z - sg(q)||^2 (``vq`` = codebook + beta * commitment);
- ``entropy``: MAGVIT-v2's entropy penalty on soft assignments p = softmax(-d(z, c) / tau): mean
  per-token entropy (want low: confident) minus the entropy of the batch-mean distribution (want
  high: all codes used). The paper weighs it with gamma = 0.02. It needs (N, K) soft assignments,
  so it is computed in training mode only (0 in eval mode).

The nearest-code search is the single function :func:`nearest_code`, computed in chunks so that
memory stays bounded for large codebooks; on CUDA it dispatches to the fused Triton kernel of
``evatok_kernels.vq`` (docs/kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def nearest_code(z: Tensor, codebook: Tensor, *, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """Nearest code of each row of ``z``: the fused Triton kernel on CUDA, else :func:`nearest_code_chunked`.

    CUDA inputs are handed to ``evatok_kernels.vq.nearest_code`` (Triton when importable; same tie
    rule, same results up to float near-ties; ``EVATOK_VQ_KERNEL=torch`` opts out); everything else
    stays here.
    """
    if z.is_cuda:
        from evatok_kernels.vq import nearest_code as dispatch  # lazy: optional GPU kernels

        return dispatch(z, codebook, chunk_size=chunk_size)
    return nearest_code_chunked(z, codebook, chunk_size=chunk_size)


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


def entropy_loss(z: Tensor, codebook: Tensor, temperature: float) -> Tensor:
    """MAGVIT-v2 entropy loss: mean per-token entropy minus entropy of the mean distribution."""
    logits = 2.0 * (z @ codebook.T) / temperature  # -|z - c|^2 / tau up to a per-row constant (unit norms)
    log_p = F.log_softmax(logits.float(), dim=-1)  # (N, K)
    p = log_p.exp()
    per_token = -(p * log_p).sum(-1).mean()
    mean_p = p.mean(0)
    batch = -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum()
    return (per_token - batch).to(z.dtype)


@dataclass
class QuantizerOutput:
    """What :meth:`VectorQuantizer.forward` returns for N tokens."""

    z_q: Tensor  # (N, code_dim) straight-through quantized codes
    indices: Tensor  # (N,) int64
    losses: dict[str, Tensor]  # codebook, commitment, vq, entropy (0-d)
    stats: dict[str, Tensor]  # usage (fraction of codes used), perplexity (0-d, detached)


class VectorQuantizer(nn.Module):
    """VQ with an l2-normalised codebook of ``codebook_size`` codes of ``code_dim`` dims."""

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        *,
        beta: float = 0.25,
        entropy_temperature: float = 0.01,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.beta = beta
        self.entropy_temperature = entropy_temperature
        self.chunk_size = chunk_size
        self.embedding = nn.Parameter(torch.randn(codebook_size, code_dim))

    def codebook(self) -> Tensor:
        """(K, code_dim) the l2-normalised codes."""
        return F.normalize(self.embedding, dim=-1)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes of ``indices`` (any shape) -> (*indices.shape, code_dim)."""
        return F.embedding(indices, self.codebook())

    def quantize(self, z: Tensor) -> Tensor:
        """(..., code_dim) encoder outputs -> (...) code indices (no losses, no gradient)."""
        flat = F.normalize(z.reshape(-1, z.shape[-1]), dim=-1)
        indices, _ = nearest_code(flat, self.codebook(), chunk_size=self.chunk_size)
        return indices.view(z.shape[:-1])

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize (N, code_dim) valid tokens (padding already removed)."""
        z = F.normalize(z, dim=-1)
        codebook = self.codebook()
        indices, _ = nearest_code(z.detach(), codebook.detach(), chunk_size=self.chunk_size)
        q = F.embedding(indices, codebook)
        codebook_loss = F.mse_loss(q, z.detach())
        commitment = F.mse_loss(z, q.detach())
        losses = {
            "codebook": codebook_loss,
            "commitment": commitment,
            "vq": codebook_loss + self.beta * commitment,
            # (N, K) soft assignments are only worth their memory when training.
            "entropy": entropy_loss(z, codebook, self.entropy_temperature) if self.training else z.new_zeros(()),
        }
        counts = torch.bincount(indices, minlength=self.codebook_size).to(torch.float64)
        p = counts / counts.sum()
        stats = {
            "usage": (counts > 0).to(torch.float64).mean(),
            "perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum()),
        }
        return QuantizerOutput(z_q=z + (q - z).detach(), indices=indices, losses=losses, stats=stats)
