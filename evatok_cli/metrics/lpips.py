"""LPIPS (Zhang et al., 2018, "v0.1" linear calibration), per frame, averaged per temporal block.

EVATok scores reconstructions with per-frame LPIPS (PAPER §7) and uses it as the proxy-reward
quality term (EVATok §3.2) and as the perceptual training loss. The definition implemented here:

1. inputs in [-1, 1] are shifted/scaled per channel: ``(x - shift) / scale`` with
   shift = (-0.030, -0.088, -0.188), scale = (0.458, 0.448, 0.450);
2. a frozen backbone (torchvision-layout VGG16 or AlexNet ``features``) gives five ReLU feature maps
   (VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; AlexNet: relu1..relu5);
3. each map is unit-normalised along channels at every position (``f / (||f||_2 + 1e-10)``);
4. the squared difference of the two normalised maps goes through a non-negative 1x1 conv with no
   bias (the "lin" head of that layer), is averaged over positions, and the five layers are summed.

Weights are never downloaded: the backbone is the torchvision checkpoint of the full model
(``vgg16-397923af.pth`` / ``alexnet-owt-7be5be79.pth``, of which the ``features.*`` keys are used)
and the heads are the ``lpips`` package's v0.1 files (``lpips/weights/v0.1/{vgg,alex}.pth``, keys
``lin{i}.model.1.weight``), given by path or found inside an installed ``lpips`` package (located
with ``importlib.util.find_spec``; the package itself is never imported).

Frames smaller than ``MIN_SIZE`` (32 px) on their short side are bilinearly upsampled so that the
short side is 32 px, for both inputs alike: AlexNet's stride-4 conv and two 3x3/2 max-pools need
at least 31 px, and VGG16's relu5_3 is 2x2 at 32 px.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from evatok_cli.metrics.pixel import per_block

log = logging.getLogger(__name__)

MIN_SIZE = 32
NETS = ("vgg", "alex")
# torchvision file names the `lpips` package itself loads; used in error messages only.
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
HEAD_FILES = {"vgg": "vgg.pth", "alex": "alex.pth"}
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

StateDict = Mapping[str, torch.Tensor]


# ----------------------------------------------------------------------------- backbones


class VGG16Features(nn.Module):
    """torchvision ``vgg16().features`` with identical indices (conv at 0,2,5,...,28)."""

    channels = (64, 128, 256, 512, 512)
    taps = (3, 8, 15, 22, 29)  # ReLU outputs relu1_2 .. relu5_3

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c_in, int(v), 3, padding=1), nn.ReLU()]
                c_in = int(v)
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _tapped(self.features, self.taps, x)


class AlexNetFeatures(nn.Module):
    """torchvision ``alexnet().features`` with identical indices (conv at 0,3,6,8,10)."""

    channels = (64, 192, 384, 256, 256)
    taps = (1, 4, 7, 9, 11)  # ReLU outputs relu1 .. relu5

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _tapped(self.features, self.taps, x)


def _tapped(seq: nn.Sequential, taps: tuple[int, ...], x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for i, layer in enumerate(seq):
        x = layer(x)
        if i in taps:
            out.append(x)
            if i == taps[-1]:
                break
    return out


_BACKBONES: dict[str, type[VGG16Features] | type[AlexNetFeatures]] = {"vgg": VGG16Features, "alex": AlexNetFeatures}


class _LinHead(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        # Index 0 is a Dropout in the reference file format (identity at evaluation); index 1 is
        # the 1x1 conv, so the weight's key is `model.1.weight` as in the `lpips` v0.1 files.
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPSHeads(nn.Module):
    """The five calibrated 1x1 heads; state-dict keys ``lin{i}.model.1.weight`` (shape (1, C_i, 1, 1))."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        for i, c in enumerate(channels):
            self.add_module(f"lin{i}", _LinHead(c))

    def __getitem__(self, i: int) -> _LinHead:
        return getattr(self, f"lin{i}")


# ----------------------------------------------------------------------------- weight loading


def lpips_package_heads(net: str) -> Path | None:
    """Path of the v0.1 heads inside an installed ``lpips`` package, or None (never imports it)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / HEAD_FILES[net]
    return path if path.is_file() else None


def _read_state(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{what} {p} is not a state dict (got {type(state).__name__})")
    return dict(state)


def _load_strict(module: nn.Module, state: StateDict, what: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{what} does not match the expected layout: {e}") from None


# ----------------------------------------------------------------------------- the metric


class LPIPS(nn.Module):
    """LPIPS v0.1 with a frozen torchvision-layout backbone, as a block metric and a training loss.

    As a metric (``lpips(recon, target, frames_per_block)``) frames are scored independently (all
    frames of the batch go through the network as one image batch), inputs are clamped to
    [-1, 1] and per-frame values are averaged within each temporal block, shape (B, T).
    ``loss(recon, target)`` is the differentiable mean over frames (target detached, no clamp).

    The module always stays in eval mode and its parameters never require grad.

    Args:
        net: ``"vgg"`` (VGG16, the default; the paper's metric) or ``"alex"``.
        backbone: path to the torchvision checkpoint of the full model (``vgg16-397923af.pth`` or
            ``alexnet-owt-7be5be79.pth``) or an already loaded state dict; its ``features.*`` keys
            must match exactly.
        heads: path to the v0.1 heads file (``vgg.pth`` / ``alex.pth``) or a state dict; None looks
            in an installed ``lpips`` package's ``weights/v0.1`` folder.
        chunk_size: at most this many frames per network pass (None: all at once).
    """

    name = "lpips"
    higher_is_better = False

    def __init__(
        self,
        net: str = "vgg",
        backbone: str | Path | StateDict | None = None,
        heads: str | Path | StateDict | None = None,
        *,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if net not in NETS:
            raise ValueError(f"unknown LPIPS net {net!r} (choose from {', '.join(NETS)})")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.net, self.chunk_size = net, chunk_size
        self.backbone = _BACKBONES[net]()
        self.heads = LPIPSHeads(self.backbone.channels)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1), persistent=False)
        self.sources = {"backbone": self._load_backbone(backbone), "heads": self._load_heads(heads)}
        self.requires_grad_(False)
        super().train(False)

    def _load_backbone(self, backbone: str | Path | StateDict | None) -> str:
        what = f"LPIPS {self.net} backbone"
        if backbone is None:
            raise FileNotFoundError(
                f"{what}: no weights given; pass backbone=PATH to torchvision's {BACKBONE_FILES[self.net]} "
                "(weights cannot be downloaded)"
            )
        src = "<state dict>"
        if not isinstance(backbone, Mapping):
            src, backbone = str(backbone), _read_state(backbone, f"{what} weights ({BACKBONE_FILES[self.net]})")
        feats = {k: v for k, v in backbone.items() if k.startswith("features.")}
        if not feats:
            raise ValueError(
                f"{what} weights {src} hold no 'features.*' keys (expected a torchvision "
                f"{BACKBONE_FILES[self.net]} state dict)"
            )
        _load_strict(self.backbone, feats, f"{what} weights {src}")
        return src

    def _load_heads(self, heads: str | Path | StateDict | None) -> str:
        what = f"LPIPS {self.net} heads"
        if heads is None:
            found = lpips_package_heads(self.net)
            if found is None:
                raise FileNotFoundError(
                    f"{what}: no path given and no installed `lpips` package holds weights/v0.1/{HEAD_FILES[self.net]}; "
                    f"pass heads=PATH to that file"
                )
            heads = found
        src = "<state dict>"
        if not isinstance(heads, Mapping):
            src, heads = str(heads), _read_state(heads, f"{what} ({HEAD_FILES[self.net]})")
        _load_strict(self.heads, heads, f"{what} {src}")
        return src

    @classmethod
    def random(cls, net: str = "vgg", seed: int = 0, **kwargs) -> LPIPS:
        """Seeded random backbone (He-normal convs, small biases) and non-negative heads; for tests."""
        if net not in NETS:
            raise ValueError(f"unknown LPIPS net {net!r} (choose from {', '.join(NETS)})")
        g = torch.Generator().manual_seed(seed)
        with torch.device("meta"):  # shapes only
            shapes = _BACKBONES[net]()
        backbone = {}
        for k, v in shapes.state_dict().items():
            if k.endswith("weight"):
                fan_in = v[0].numel()
                backbone[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
            else:
                backbone[k] = torch.randn(v.shape, generator=g) * 0.01
        heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(shapes.channels)}
        model = cls(net, backbone=backbone, heads=heads, **kwargs)
        model.sources = {"backbone": f"random(seed={seed})", "heads": f"random(seed={seed})"}
        return model

    def train(self, mode: bool = True) -> LPIPS:
        """A frozen metric network: stays in eval mode whatever a parent module asks."""
        return super().train(False)

    # -- core ------------------------------------------------------------------------------

    def images(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) x 2 in [-1, 1] -> (N,) LPIPS distances (differentiable wrt both)."""
        if x.shape != y.shape or x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"expected two (N, 3, H, W) images of one shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        h, w = x.shape[-2:]
        if min(h, w) < MIN_SIZE:
            size = (max(MIN_SIZE, round(h * MIN_SIZE / min(h, w))), max(MIN_SIZE, round(w * MIN_SIZE / min(h, w))))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        n = x.shape[0]
        both = torch.cat([x, y]).to(self.shift.dtype)  # (2N, 3, H, W): one pass for both inputs
        feats = self.backbone((both - self.shift) / self.scale)
        total = both.new_zeros(n)
        for i, f in enumerate(feats):
            # vector_norm's gradient is 0 (not NaN) at an all-zero feature vector
            f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + 1e-10)
            d = (f[:n] - f[n:]).pow(2)
            total = total + self.heads[i](d).mean(dim=(1, 2, 3))
        return total

    def frames(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(B, 3, F, H, W) x 2 in [-1, 1] -> (B, F) per-frame LPIPS (differentiable)."""
        if recon.shape != target.shape or recon.dim() != 5:
            raise ValueError(
                f"expected two (B, 3, F, H, W) videos of one shape, got {tuple(recon.shape)} and {tuple(target.shape)}"
            )
        b, c, f, h, w = recon.shape
        x = recon.transpose(1, 2).reshape(b * f, c, h, w)  # (B*F, 3, H, W)
        y = target.transpose(1, 2).reshape(b * f, c, h, w)
        step = self.chunk_size or x.shape[0]
        vals = [self.images(x[i : i + step], y[i : i + step]) for i in range(0, x.shape[0], step)]
        return torch.cat(vals).view(b, f)

    # -- the two uses --------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, recon: torch.Tensor, target: torch.Tensor, frames_per_block: int) -> torch.Tensor:
        """Block metric: (B, 3, F, H, W) x 2 -> (B, F // frames_per_block), inputs clamped to [-1, 1]."""
        vals = self.frames(recon.float().clamp(-1, 1), target.float().clamp(-1, 1))
        return per_block(vals.float(), frames_per_block)

    def loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Perceptual loss: mean per-frame LPIPS; gradients reach ``recon`` only."""
        return self.frames(recon, target.detach()).mean()


__all__ = ["LPIPS", "LPIPSHeads", "AlexNetFeatures", "VGG16Features", "MIN_SIZE", "NETS", "lpips_package_heads"]
