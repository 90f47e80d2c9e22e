"""Vector quantizer: chunked nearest-code search, straight-through gradient, losses and stats."""

from __future__ import annotations

import math

import pytest
import torch

from evatok_cli.models.quantizer import VectorQuantizer, nearest_code


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny models gain nothing from two, and shared CI cores make OpenMP spin."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _naive(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)  # (N, K)
    return d.argmin(1), d.min(1).values  # argmin: first minimum


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])
def test_nearest_code_chunked_equals_naive_with_ties(chunk):
    g = torch.Generator().manual_seed(0)
    # Small integers: every distance is exact, so ties are real ties (many of them).
    codebook = torch.randint(-2, 3, (53, 4), generator=g).float()
    codebook[40] = codebook[3]  # duplicate codes: the lower index must win
    z = torch.randint(-2, 3, (101, 4), generator=g).float()  # N not a multiple of any chunk
    z[0] = codebook[3]
    idx, dist = nearest_code(z, codebook, chunk_size=chunk)
    ref_idx, ref_dist = _naive(z, codebook)
    assert torch.equal(idx, ref_idx) and torch.equal(dist, ref_dist)
    assert idx[0] == 3 and dist[0] == 0


def test_nearest_code_random_float64_matches_cdist():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1000, 8, generator=g, dtype=torch.float64)
    codebook = torch.randn(300, 8, generator=g, dtype=torch.float64)
    idx, dist = nearest_code(z, codebook, chunk_size=128)
    assert torch.equal(idx, torch.cdist(z, codebook).argmin(1))
    assert torch.allclose(dist, torch.cdist(z, codebook).min(1).values ** 2)


def test_nearest_code_rejects_bad_shapes():
    with pytest.raises(ValueError):
        nearest_code(torch.zeros(3, 4), torch.zeros(5, 3))


def test_straight_through_gradient_losses_and_stats():
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8)
    z = torch.randn(200, 8, requires_grad=True)
    out = vq(z)
    assert out.z_q.shape == (200, 8) and out.indices.shape == (200,)
    # Forward value is the (unit-norm) code, gradient is the identity through normalisation.
    assert torch.allclose(out.z_q, vq.lookup(out.indices), atol=1e-6)
    (out.z_q * torch.randn(200, 8)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert set(out.losses) == {"codebook", "commitment", "vq", "entropy"}
    assert all(torch.isfinite(v) for v in out.losses.values())
    assert torch.isclose(out.losses["vq"], out.losses["codebook"] + 0.25 * out.losses["commitment"])
    # The codebook receives gradient from the codebook loss and the entropy loss.
    vq.zero_grad()
    fresh = vq(z.detach()).losses
    (fresh["codebook"] + fresh["entropy"]).backward()
    assert vq.embedding.grad is not None and vq.embedding.grad.abs().sum() > 0
    used = out.indices.unique().numel()
    assert math.isclose(float(out.stats["usage"]), used / 64)
    assert 1.0 <= float(out.stats["perplexity"]) <= used + 1e-6


def test_usage_and_perplexity_extremes():
    vq = VectorQuantizer(16, 4)
    codes = vq.codebook().detach()
    one = vq(codes[[5] * 10].clone())  # every token the same code
    assert float(one.stats["usage"]) == 1 / 16 and math.isclose(float(one.stats["perplexity"]), 1.0)
    allc = vq(codes.clone())  # each code once
    assert float(allc.stats["usage"]) == 1.0 and math.isclose(float(allc.stats["perplexity"]), 16.0, rel_tol=1e-6)
    assert torch.equal(allc.indices, torch.arange(16))


def test_entropy_loss_prefers_confident_diverse_assignments():
    vq = VectorQuantizer(16, 4, entropy_temperature=0.01)
    codes = vq.codebook().detach()
    diverse = vq(codes.clone()).losses["entropy"]
    collapsed = vq(codes[[0] * 16].clone()).losses["entropy"]
    assert diverse < collapsed
