"""Weight-free metrics: PSNR and SSIM, per frame, averaged per temporal block.

PSNR is computed on pixels mapped to [0, 1] (peak 1) over all three channels of a frame, capped at
100 dB for identical frames. SSIM follows Wang et al. (2004): an 11x11 Gaussian window with
sigma 1.5, constants K1 = 0.01 and K2 = 0.03 on a [0, 1] range, "valid" filtering (no padding),
computed per RGB channel and averaged over channels and positions.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

PSNR_CAP = 100.0


class Metric(Protocol):
    name: str
    higher_is_better: bool

    def __call__(self, recon: torch.Tensor, target: torch.Tensor, frames_per_block: int) -> torch.Tensor:
        """(B, 3, F, H, W) x 2 -> (B, F // frames_per_block) per-block values."""
        ...


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x.float().clamp(-1, 1) + 1) / 2


def per_block(values: torch.Tensor, frames_per_block: int) -> torch.Tensor:
    """(B, F) per-frame values -> (B, T) block means."""
    b, f = values.shape
    if f % frames_per_block:
        raise ValueError(f"{f} frames do not split into blocks of {frames_per_block}")
    return values.view(b, f // frames_per_block, frames_per_block).mean(dim=2)


def psnr_frames(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F) PSNR in dB."""
    if recon.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(recon.shape)} vs {tuple(target.shape)}")
    mse = (_to_unit(recon) - _to_unit(target)).pow(2).mean(dim=(1, 3, 4))
    return torch.where(mse > 0, -10.0 * torch.log10(mse.clamp_min(1e-30)), torch.full_like(mse, PSNR_CAP)).clamp(
        max=PSNR_CAP
    )


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_frames(recon: torch.Tensor, target: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F) SSIM."""
    if recon.shape != target.shape:
        raise ValueError(f"shape mismatch: {tuple(recon.shape)} vs {tuple(target.shape)}")
    b, c, f, h, w = recon.shape
    win = min(window, h, w)
    x = _to_unit(recon).permute(0, 2, 1, 3, 4).reshape(b * f * c, 1, h, w).double()
    y = _to_unit(target).permute(0, 2, 1, 3, 4).reshape(b * f * c, 1, h, w).double()
    g = _gaussian_window(win, sigma, x.device, x.dtype)
    gx, gy = g.view(1, 1, 1, win), g.view(1, 1, win, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, gx), gy)

    mu_x, mu_y = blur(x), blur(y)
    sxx = blur(x * x) - mu_x**2
    syy = blur(y * y) - mu_y**2
    sxy = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3)).view(b, f, c).mean(dim=2).float()


class PSNR:
    name = "psnr"
    higher_is_better = True

    def __call__(self, recon: torch.Tensor, target: torch.Tensor, frames_per_block: int) -> torch.Tensor:
        return per_block(psnr_frames(recon, target), frames_per_block)


class SSIM:
    name = "ssim"
    higher_is_better = True

    def __init__(self, window: int = 11, sigma: float = 1.5) -> None:
        self.window, self.sigma = window, sigma

    def __call__(self, recon: torch.Tensor, target: torch.Tensor, frames_per_block: int) -> torch.Tensor:
        return per_block(ssim_frames(recon, target, self.window, self.sigma), frames_per_block)
