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

from evatok_kernels.chunked import nearest_code_chunked

__all__ = ["VectorQuantizer", "nearest_code", "nearest_code_chunked"]


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
