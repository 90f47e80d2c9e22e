"""PSNR/SSIM against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from evatok_cli.metrics import get_metric, psnr_frames, ssim_frames


def test_psnr_known_noise_level():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 32, 32, generator=g) * 1.6 - 0.8
    # +-0.1 in [-1,1] units is +-0.05 in [0,1] units: MSE 0.0025 -> 26.0206 dB exactly
    sign = torch.randint(0, 2, target.shape, generator=g).float() * 2 - 1
    recon = target + 0.1 * sign
    expected = -10 * math.log10(0.05**2)
    assert psnr_frames(recon, target) == pytest.approx(torch.full((2, 8), expected), abs=1e-4)
    pb = get_metric("psnr")(recon, target, 4)
    assert pb.shape == (2, 2) and pb == pytest.approx(torch.full((2, 2), expected), abs=1e-4)
    assert (psnr_frames(target, target) == 100.0).all()


def test_psnr_per_block_localises_damage():
    target = torch.zeros(1, 3, 8, 16, 16)
    recon = target.clone()
    recon[:, :, 4:] += 0.2  # only block 2 damaged
    pb = get_metric("psnr")(recon, target, 4)
    assert pb[0, 0] == 100.0 and pb[0, 1] == pytest.approx(-10 * math.log10(0.1**2), abs=1e-4)


def test_ssim_identity_constant_shift_and_ordering():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 2, 32, 32, generator=g) * 2 - 1
    assert ssim_frames(x, x) == pytest.approx(torch.ones(1, 2), abs=1e-6)
    # a constant image vs itself shifted by d: SSIM = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1) (variances 0)
    a = torch.full((1, 3, 1, 16, 16), 0.0)  # 0.5 in unit range
    b = torch.full((1, 3, 1, 16, 16), 0.2)  # 0.6
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1)
    assert ssim_frames(a, b).item() == pytest.approx(expected, abs=1e-6)
    small = ssim_frames(x + 0.05 * torch.randn(x.shape, generator=g), x).mean()
    large = ssim_frames(x + 0.3 * torch.randn(x.shape, generator=g), x).mean()
    assert 1 > small > large > 0
    with pytest.raises(ValueError, match="unknown metric"):
        get_metric("nope")
