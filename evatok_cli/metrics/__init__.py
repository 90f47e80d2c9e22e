"""Reconstruction-quality metrics with one interface: ``metric(recon, target, frames_per_block)``.

Inputs are float videos (B, 3, F, H, W) in [-1, 1] (DESIGN §3). Every metric returns per-frame
values averaged within each temporal block, shape (B, T) with T = F / frames_per_block, so the
search stage can score block t of a reconstruction on its own. ``higher_is_better`` tells the
reward which way to orient the z-score.
"""

from __future__ import annotations

from evatok_cli.metrics.pixel import PSNR, SSIM, Metric, per_block, psnr_frames, ssim_frames

METRICS: dict[str, type] = {"psnr": PSNR, "ssim": SSIM}


def get_metric(name: str, **kwargs) -> Metric:
    """A metric by name (``psnr``, ``ssim``; ``lpips`` once weights are given)."""
    try:
        return METRICS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown metric {name!r} (choose from {', '.join(sorted(METRICS))})") from None


__all__ = ["METRICS", "PSNR", "SSIM", "Metric", "get_metric", "per_block", "psnr_frames", "ssim_frames"]

# Weighted metrics (weights come from paths the user gives; see docs/evaluation.md).
from evatok_cli.metrics.fvd import FVD, FeatureStats, FVDResult, frechet_distance  # noqa: E402
from evatok_cli.metrics.lpips import LPIPS  # noqa: E402

METRICS["lpips"] = LPIPS
__all__ += ["FVD", "FVDResult", "FeatureStats", "LPIPS", "frechet_distance"]
