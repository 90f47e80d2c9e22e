"""Fused nearest-code search (evatok_kernels.vq): the Triton kernel against the naive reference.

Without a GPU the kernel runs in Triton's CPU interpreter (conftest.py sets TRITON_INTERPRET=1), so
sizes stay small and tiles are shrunk (block_n/block_k 16 or 32) to exercise many tiles, ragged
edges and code splits. With CUDA the same cases run the compiled kernel, plus larger ones.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from evatok_kernels import vq

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _kernel_ready() -> tuple[bool, str]:
    if not HAVE_TRITON:
        return False, "triton is not importable (pip install 'evatok[kernels]')"
    if not CUDA and not vq.interpreter_active():
        return False, (
            "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1; "
            "run `TRITON_INTERPRET=1 pytest tests/kernels`"
        )
    return True, ""


_READY, _WHY = _kernel_ready()
needs_kernel = pytest.mark.skipif(not _READY, reason=_WHY)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g), dim=-1).to(DEVICE)


def _assert_matches_reference(z, codebook, *, float_ties: bool = False, **kw):
    """Kernel == reference: indices exactly, distances to float tolerance.

    ``float_ties``: for large random CUDA cases, where the reference (torch's cdist) and the kernel
    sum the D squared differences in different orders, two codes whose float32 distances differ
    by a rounding error may swap; allow exactly those (checked in float64), nothing else.
    """
    idx, dist = vq.nearest_code_triton(z, codebook, **kw)
    ref_idx, ref_dist = vq.nearest_code_reference(z, codebook)
    assert idx.dtype == torch.int64 and idx.shape == (z.shape[0],) and dist.dtype == z.dtype
    differ = idx != ref_idx
    if float_ties and differ.any():
        zd, cd = z[differ].double(), codebook.double()
        gap = ((zd - cd[idx[differ]]) ** 2).sum(1) - ((zd - cd[ref_idx[differ]]) ** 2).sum(1)
        assert gap.abs().max() < 1e-6 and int(differ.sum()) <= max(1, z.shape[0] // 10_000), gap
    else:
        assert torch.equal(idx, ref_idx), f"{int(differ.sum())} indices differ"
    torch.testing.assert_close(dist, ref_dist, atol=1e-6, rtol=1e-5)
    return idx, dist


@needs_kernel
@pytest.mark.parametrize(
    ("n", "k", "d", "block_n", "block_k", "splits"),
    [
        (200, 300, 8, 32, 32, 1),  # N, K not multiples of the tiles
        (200, 300, 8, 32, 32, 3),  # code range split over programs, merged afterwards
        (70, 90, 16, 16, 32, 1),  # D = 16
        (5, 3, 8, 16, 16, 1),  # N and K smaller than one tile
    ],
)
def test_random_unit_codes_equal_reference(n, k, d, block_n, block_k, splits):
    g = torch.Generator().manual_seed(n + k + d + splits)
    _assert_matches_reference(_unit(n, d, g), _unit(k, d, g), block_n=block_n, block_k=block_k, splits=splits)


@needs_kernel
@pytest.mark.parametrize("splits", [1, 2])
def test_ties_go_to_the_lowest_index(splits):
    # Small integers: every distance is exact, so ties are real ties, within and across tiles.
    g = torch.Generator().manual_seed(0)
    codebook = torch.randint(-2, 3, (90, 8), generator=g).float()
    codebook[5] = codebook[70]  # duplicate across tiles (16-code tiles): 5 must win
    codebook[33] = codebook[34] = codebook[40]  # duplicates inside one tile: 33 must win
    z = torch.randint(-2, 3, (77, 8), generator=g).float()
    z[0], z[1] = codebook[70], codebook[40]
    idx, dist = _assert_matches_reference(z.to(DEVICE), codebook.to(DEVICE), block_n=16, block_k=16, splits=splits)
    assert idx[:2].tolist() == [5, 33] and dist[:2].tolist() == [0.0, 0.0]


@needs_kernel
def test_zero_vectors_and_zero_codes():
    # One-hot codes are all at distance exactly 1 from z = 0: a 90-way tie, index 0 wins.
    codebook = torch.eye(8).repeat(12, 1)[:90]  # (90, 8), duplicates everywhere
    z = torch.zeros(40, 8)
    idx, dist = _assert_matches_reference(z.to(DEVICE), codebook.to(DEVICE), block_n=16, block_k=16, splits=2)
    assert idx.eq(0).all() and dist.eq(1).all()
    # A zero code in a later tile is the exact nearest of z = 0; a later duplicate of it loses.
    codebook[50] = 0
    codebook[83] = 0
    idx, dist = _assert_matches_reference(z.to(DEVICE), codebook.to(DEVICE), block_n=16, block_k=16)
    assert idx.eq(50).all() and dist.eq(0).all()


@needs_kernel
def test_half_precision_inputs_and_empty_batch():
    g = torch.Generator().manual_seed(3)
    z, codebook = _unit(50, 8, g).to(torch.bfloat16), _unit(60, 8, g).to(torch.bfloat16)
    idx, dist = vq.nearest_code_triton(z, codebook, block_n=32, block_k=32)
    ref_idx, ref_dist = vq.nearest_code_reference(z, codebook)  # float32 distances of the bf16 values
    assert torch.equal(idx, ref_idx) and dist.dtype == torch.bfloat16
    torch.testing.assert_close(dist.float(), ref_dist.float(), atol=1e-2, rtol=1e-2)
    idx, dist = vq.nearest_code_triton(z[:0], codebook)
    assert idx.shape == (0,) and dist.shape == (0,)


@needs_kernel
def test_bad_arguments():
    z = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        vq.nearest_code_triton(z, z, block_n=48)
    with pytest.raises(ValueError):
        vq.nearest_code_triton(z, torch.zeros(4, 7, device=DEVICE))
    with pytest.raises(ValueError, match="at least one"):
        vq.nearest_code_triton(z, torch.zeros(0, 8, device=DEVICE))


def test_reference_and_chunked_agree_on_cpu():
    g = torch.Generator().manual_seed(4)
    z, codebook = _unit(500, 8, g).cpu(), _unit(700, 8, g).cpu()
    ref_idx, ref_dist = vq.nearest_code_reference(z, codebook)
    idx, dist = vq.nearest_code_chunked(z, codebook, chunk_size=128)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist, ref_dist, atol=1e-5, rtol=1e-5)


def test_dispatch_rules(monkeypatch):
    z = torch.zeros(3, 8)
    monkeypatch.delenv("EVATOK_VQ_KERNEL", raising=False)
    assert vq.vq_kernel_mode() == "auto" and not vq.uses_triton(z)  # CPU: chunked torch
    idx, _ = vq.nearest_code(z, torch.eye(8))
    assert idx.tolist() == [0, 0, 0]
    monkeypatch.setenv("EVATOK_VQ_KERNEL", "torch")
    assert not vq.uses_triton(z)
    monkeypatch.setenv("EVATOK_VQ_KERNEL", "triton")
    with pytest.raises(RuntimeError, match="CUDA"):
        vq.nearest_code(z, torch.eye(8))
    monkeypatch.setenv("EVATOK_VQ_KERNEL", "fast")
    with pytest.raises(ValueError, match="EVATOK_VQ_KERNEL"):
        vq.vq_kernel_mode()


# ------------------------------------------------------------------------------- CUDA only
cuda_kernel = pytest.mark.skipif(not (CUDA and HAVE_TRITON), reason="needs a CUDA device and triton")


@cuda_kernel
@pytest.mark.parametrize(("n", "k"), [(10_000, 4096), (4096, 16_384), (33_333, 8192)])
def test_cuda_kernel_default_tiles_equal_reference(n, k):
    g = torch.Generator().manual_seed(n)
    _assert_matches_reference(_unit(n, 8, g), _unit(k, 8, g), float_ties=True)


@cuda_kernel
def test_quantizer_dispatches_to_kernel_on_cuda(monkeypatch):
    from evatok_cli.models.quantizer import VectorQuantizer

    torch.manual_seed(0)
    q = VectorQuantizer(4096, 8).cuda()
    z = torch.randn(5000, 8, device="cuda", requires_grad=True)
    monkeypatch.setenv("EVATOK_VQ_KERNEL", "torch")
    ref = q(z)
    monkeypatch.setenv("EVATOK_VQ_KERNEL", "triton")  # raises if the kernel cannot run
    out = q(z)
    # The torch search uses |z|^2 - 2 z.c + |c|^2, the kernel exact differences: only float ties may swap.
    differ = out.indices != ref.indices
    assert int(differ.sum()) <= 2
    if differ.any():
        zn, cb = F.normalize(z.detach()[differ], dim=-1).double(), q.codebook().detach().double()
        gap = ((zn - cb[out.indices[differ]]) ** 2).sum(1) - ((zn - cb[ref.indices[differ]]) ** 2).sum(1)
        assert gap.abs().max() < 1e-5
    out.z_q.sum().backward()  # straight-through: d z_q / d z = identity (through the normalisation)
    assert z.grad is not None and torch.isfinite(z.grad).all()
