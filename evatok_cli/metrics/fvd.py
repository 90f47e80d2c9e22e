"""Fréchet Video Distance (Unterthiner et al., 2018): the rFVD / gFVD of PAPER §7.

FVD = ||mu_r - mu_g||^2 + tr(S_r) + tr(S_g) - 2 tr((S_r^1/2 S_g S_r^1/2)^1/2), the Fréchet distance
of two Gaussians fitted to Kinetics-400 I3D features of real and generated clips.

Two feature networks ("variants"), named explicitly by the caller (a file is never sniffed):

``videogpt``
    ``i3d_pretrained_400.pt``: a PyTorch state dict of InceptionI3d (``evatok_cli.metrics.i3d``),
    as used by VideoGPT and TATS. Input (B, 3, T, 224, 224) float in [-1, 1]; the features are the
    400 pre-softmax logits averaged over time. Covariance with ddof=1 (as those codebases).
``styleganv``
    ``i3d_torchscript.pt``: StyleGAN-V's TorchScript port of the TF-Hub I3D, loaded with
    ``torch.jit.load`` and called as ``model(x, rescale=False, resize=False, return_features=True)``
    on (B, 3, T, 224, 224) float in [-1, 1] (we resize and scale ourselves); the features are its
    400-dim pre-softmax output. Covariance with ddof=0 (as StyleGAN-V).

Preprocessing (both): clamp to [-1, 1]; every frame resized bilinearly (align_corners=False, no
antialias) so its short side is ``resolution`` (224), then centre-cropped to a square (for the
square clips of this project that is a plain resize to 224x224).

Statistics are running sums in float64 (count, sum, sum of outer products), so shards, batches and
ranks merge exactly and real-data statistics can be cached on disk (safetensors) and reused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from evatok_cli.metrics.i3d import I3D, I3DConfig

log = logging.getLogger(__name__)

RESOLUTION = 224
STATS_FORMAT = "evatok-feature-stats-1"
ArrayLike = torch.Tensor | np.ndarray


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _f64(x: ArrayLike) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


# ----------------------------------------------------------------------------- statistics


class FeatureStats:
    """Running first/second moments of D-dim features, float64 on CPU.

    ``meta`` (str -> str) records what produced the features (variant, weights sha256, resolution);
    stats with different metadata refuse to merge or to be compared.
    """

    def __init__(self, dim: int, meta: Mapping[str, str] | None = None) -> None:
        if dim < 1:
            raise ValueError(f"feature dim must be >= 1, got {dim}")
        self.dim = dim
        self.meta = dict(meta or {})
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, feats: ArrayLike) -> FeatureStats:
        """Add a batch of features (N, D)."""
        f = _f64(feats)
        if f.dim() != 2 or f.shape[1] != self.dim:
            raise ValueError(f"expected features (N, {self.dim}), got {tuple(f.shape)}")
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.outer += f.T @ f
        return self

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Add another set's sums into this one (in place)."""
        if other.dim != self.dim or other.meta != self.meta:
            raise ValueError(f"cannot merge stats of dim {other.dim} {other.meta} into dim {self.dim} {self.meta}")
        self.count += other.count
        self.sum += other.sum
        self.outer += other.outer
        return self

    def all_reduce(self, group: Any = None) -> FeatureStats:
        """Sum the statistics over all ranks (in place); a no-op unless torch.distributed is initialised."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
            return self
        device = (
            torch.device("cuda", torch.cuda.current_device())
            if dist.get_backend(group) == "nccl"
            else torch.device("cpu")
        )
        flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.sum, self.outer.flatten()])
        flat = flat.to(device)
        dist.all_reduce(flat, group=group)
        flat = flat.cpu()
        self.count = int(flat[0].item())  # float64 holds counts exactly up to 2**53
        self.sum = flat[1 : 1 + self.dim].clone()
        self.outer = flat[1 + self.dim :].view(self.dim, self.dim).clone()
        return self

    def mean(self) -> torch.Tensor:
        if self.count < 1:
            raise ValueError("no features accumulated")
        return self.sum / self.count

    def cov(self, ddof: int = 1) -> torch.Tensor:
        """Covariance (D, D): (sum x x^T - n mu mu^T) / (n - ddof)."""
        if self.count <= ddof:
            raise ValueError(f"a covariance with ddof={ddof} needs more than {ddof} samples, have {self.count}")
        mu = self.mean()
        c = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - ddof)
        return (c + c.T) / 2

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "sum": self.sum.clone(), "outer": self.outer.clone(), "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureStats:
        s, outer = _f64(d["sum"]), _f64(d["outer"])
        if s.dim() != 1 or outer.shape != (s.shape[0], s.shape[0]):
            raise ValueError(f"inconsistent stats: sum {tuple(s.shape)}, outer {tuple(outer.shape)}")
        stats = cls(s.shape[0], d.get("meta"))
        stats.count, stats.sum, stats.outer = int(d["count"]), s.clone(), outer.clone()
        return stats

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file (metadata: format + ``meta``); atomic (temp name, then rename)."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        tensors = {
            "count": torch.tensor([self.count], dtype=torch.int64),
            "sum": self.sum.contiguous(),
            "outer": self.outer.contiguous(),
        }
        save_file(tensors, str(tmp), metadata={"format": STATS_FORMAT, **self.meta})
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"feature statistics not found: {p}")
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.pop("format", None) != STATS_FORMAT:
                raise ValueError(f"{p} is not an evatok feature-statistics file ({STATS_FORMAT})")
            d = {k: f.get_tensor(k) for k in ("count", "sum", "outer")}
        return cls.from_dict({"count": int(d["count"][0]), "sum": d["sum"], "outer": d["outer"], "meta": meta})


# ----------------------------------------------------------------------------- Fréchet distance


def _psd_eigs(w: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a PSD matrix with round-off removed: those below d * eps * max|w| become 0.

    Without the cut, the ~1e-16 relative noise on the null space of a rank-deficient covariance
    (fewer samples than dims) turns into ~1e-8 relative errors after the square root.
    """
    tol = w.abs().max() * w.shape[0] * torch.finfo(w.dtype).eps
    return torch.where(w > tol, w, torch.zeros_like(w))


def sqrtm_psd(mat: ArrayLike) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition (float64; round-off eigenvalues -> 0)."""
    m = _f64(mat)
    w, v = torch.linalg.eigh((m + m.T) / 2)
    return (v * _psd_eigs(w).sqrt()) @ v.T


def frechet_distance(mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), in float64.

    tr((cov1 cov2)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix cov1^1/2 cov2 cov1^1/2 (same non-zero spectrum as cov1 cov2); eigenvalues at
    round-off level (negative ones included) count as 0.
    """
    mu1, mu2, cov1, cov2 = _f64(mu1), _f64(mu2), _f64(cov1), _f64(cov2)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu {tuple(mu1.shape)}/{tuple(mu2.shape)}, cov {tuple(cov1.shape)}/{tuple(cov2.shape)}"
        )
    s1 = sqrtm_psd(cov1)
    m = s1 @ cov2 @ s1
    tr_covmean = _psd_eigs(torch.linalg.eigvalsh((m + m.T) / 2)).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------- preprocessing


def resize_frames(videos: torch.Tensor, resolution: int = RESOLUTION) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, C, F, R, R): short side to R (bilinear), centre crop."""
    b, c, f, h, w = videos.shape
    if (h, w) != (resolution, resolution):
        x = videos.transpose(1, 2).reshape(b * f, c, h, w)  # (B*F, C, H, W)
        scale = resolution / min(h, w)
        size = (resolution, math.ceil(w * scale)) if h <= w else (math.ceil(h * scale), resolution)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        x = x[:, :, top : top + resolution, left : left + resolution]
        videos = x.reshape(b, f, c, resolution, resolution).transpose(1, 2)
    return videos.contiguous()


# ----------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class _Variant:
    ddof: int
    load: Callable[[Path], torch.nn.Module]
    call: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def _load_torchscript(path: Path) -> torch.nn.Module:
    return torch.jit.load(str(path), map_location="cpu").eval()


VARIANTS: dict[str, _Variant] = {
    "videogpt": _Variant(ddof=1, load=lambda p: I3D.from_checkpoint(p), call=lambda net, x: net(x)),
    "styleganv": _Variant(
        ddof=0, load=_load_torchscript, call=lambda net, x: net(x, rescale=False, resize=False, return_features=True)
    ),
}
WEIGHT_FILES = {"videogpt": "i3d_pretrained_400.pt", "styleganv": "i3d_torchscript.pt"}


@dataclass(frozen=True)
class FVDResult:
    """One FVD value with what is needed to report it (FVDReport-friendly)."""

    fvd: float
    variant: str
    weights_sha256: str
    resolution: int
    feature_dim: int
    n_real: int
    n_fake: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FVD:
    """FVD feature extraction and scoring with one I3D variant.

    Usage::

        fvd = FVD.load("i3d_pretrained_400.pt", variant="videogpt").to("cuda")
        real, fake = fvd.new_stats(), fvd.new_stats()
        for target, recon in batches:          # (B, 3, F, H, W) in [-1, 1]
            fvd.update(real, target); fvd.update(fake, recon)
        real.all_reduce(); fake.all_reduce()   # under torchrun
        result = fvd.compute(real, fake)       # FVDResult

    Args:
        net: the feature network (an ``I3D`` or a TorchScript module).
        variant: ``"videogpt"`` or ``"styleganv"`` (how ``net`` is called; the covariance ddof).
        weights_sha256: recorded in statistics metadata and in results.
        resolution: frame size fed to the network (224 for every published FVD number; smaller
            only for plumbing tests).
        feature_dim: feature size (400 for both Kinetics-400 variants).
        batch_size: at most this many clips per network pass (None: the whole batch).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        variant: str,
        *,
        weights_sha256: str,
        resolution: int = RESOLUTION,
        feature_dim: int = 400,
        batch_size: int | None = None,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown FVD variant {variant!r} (choose from {', '.join(VARIANTS)})")
        if resolution < 1 or feature_dim < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError(
                f"invalid FVD settings: resolution={resolution}, feature_dim={feature_dim}, batch_size={batch_size}"
            )
        self.net, self.variant, self.weights_sha256 = net.eval(), variant, weights_sha256
        self.resolution, self.feature_dim, self.batch_size = resolution, feature_dim, batch_size
        self.ddof = VARIANTS[variant].ddof

    @classmethod
    def load(cls, path: str | Path, variant: str, **kwargs) -> FVD:
        """Load ``i3d_pretrained_400.pt`` (variant ``videogpt``) or ``i3d_torchscript.pt`` (``styleganv``)."""
        if variant not in VARIANTS:
            raise ValueError(f"unknown FVD variant {variant!r} (choose from {', '.join(VARIANTS)})")
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"FVD ({variant}) weights not found: {p} (expected {WEIGHT_FILES[variant]})")
        net = VARIANTS[variant].load(p)
        return cls(net, variant, weights_sha256=file_sha256(p), **kwargs)

    @classmethod
    def random(cls, seed: int = 0, **kwargs) -> FVD:
        """The ``videogpt`` variant on a seeded random I3D (plumbing tests only)."""
        net = I3D.random(seed, I3DConfig(num_classes=kwargs.get("feature_dim", 400)))
        return cls(net, "videogpt", weights_sha256=f"random(seed={seed})", **kwargs)

    def to(self, device: str | torch.device) -> FVD:
        self.net = self.net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        p = next(iter(self.net.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def meta(self) -> dict[str, str]:
        return {"variant": self.variant, "weights_sha256": self.weights_sha256, "resolution": str(self.resolution)}

    @torch.no_grad()
    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> (B, feature_dim) float32 on the network's device."""
        if videos.dim() != 5 or videos.shape[1] != 3:
            raise ValueError(f"expected videos (B, 3, F, H, W), got {tuple(videos.shape)}")
        x = resize_frames(videos.to(self.device, torch.float32).clamp(-1, 1), self.resolution)
        step = self.batch_size or x.shape[0]
        call = VARIANTS[self.variant].call
        out = torch.cat([call(self.net, x[i : i + step]).float() for i in range(0, x.shape[0], step)])
        if out.shape != (x.shape[0], self.feature_dim):
            raise ValueError(
                f"{self.variant} network returned {tuple(out.shape)}, expected ({x.shape[0]}, {self.feature_dim})"
            )
        return out

    def new_stats(self) -> FeatureStats:
        return FeatureStats(self.feature_dim, self.meta)

    def update(self, stats: FeatureStats, videos: torch.Tensor) -> FeatureStats:
        if stats.meta != self.meta:
            raise ValueError(f"statistics made with {stats.meta}, this FVD is {self.meta}")
        return stats.update(self.features(videos))

    def compute(self, real: FeatureStats, fake: FeatureStats) -> FVDResult:
        for s in (real, fake):
            if s.meta != self.meta:
                raise ValueError(f"statistics made with {s.meta}, this FVD is {self.meta}")
        value = frechet_distance(real.mean(), real.cov(self.ddof), fake.mean(), fake.cov(self.ddof))
        return FVDResult(
            fvd=value,
            variant=self.variant,
            weights_sha256=self.weights_sha256,
            resolution=self.resolution,
            feature_dim=self.feature_dim,
            n_real=real.count,
            n_fake=fake.count,
        )


__all__ = [
    "FVD",
    "FVDResult",
    "FeatureStats",
    "RESOLUTION",
    "VARIANTS",
    "WEIGHT_FILES",
    "file_sha256",
    "frechet_distance",
    "resize_frames",
    "sqrtm_psd",
]
