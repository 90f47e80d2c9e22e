"""Inception-v1 I3D (Carreira & Zisserman, 2017), the feature network of FVD.

Module and parameter names follow the PyTorch I3D state-dict layout used by the widely shared
Kinetics-400 checkpoint ``i3d_pretrained_400.pt`` (VideoGPT / TATS), e.g.
``Conv3d_1a_7x7.conv3d.weight``, ``Conv3d_1a_7x7.bn.running_mean``, ``Mixed_3b.b1b.conv3d.weight``,
``logits.conv3d.bias``, so that file loads strictly.

Every conv and max-pool uses TensorFlow-style "same" padding computed from the input size
(zero-padded; the pools follow ReLUs, so zeros never win over real activations). Batch norm uses
eps=1e-5 by default, as the VideoGPT / TATS evaluation code does for this checkpoint.

Head: the reference applies a 2x7x7 average pool (stride 1) to the Mixed_5c output (2x7x7 for a
16x224x224 clip), then the 1x1x1 logits conv, then averages the logits over the remaining time
steps. Here the pool window is clipped to the feature map (so tiny test inputs work) and the
logits are averaged over every remaining position: identical to the reference wherever the
reference runs (a Mixed_5c map of >= 2 time steps and exactly 7x7, e.g. 16x224x224 clips).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(kw_only=True)
class I3DConfig:
    num_classes: int = 400
    in_channels: int = 3
    bn_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.in_channels < 1 or not self.bn_eps > 0:
            raise ValueError(f"invalid I3DConfig: {self}")


Triple = tuple[int, int, int]


def _same_pad(size: Triple, kernel: Triple, stride: Triple) -> tuple[int, ...]:
    """F.pad argument (w_front, w_back, h_front, h_back, t_front, t_back) for TF "same" padding."""
    pads = []
    for s, k, st in zip(size, kernel, stride):
        p = max(k - st, 0) if s % st == 0 else max(k - s % st, 0)
        pads.append((p // 2, p - p // 2))
    (tf, tb), (hf, hb), (wf, wb) = pads
    return (wf, wb, hf, hb, tf, tb)


class SamePadMaxPool3d(nn.Module):
    def __init__(self, kernel: Triple, stride: Triple) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, _same_pad(tuple(x.shape[2:]), self.kernel, self.stride))
        return F.max_pool3d(x, self.kernel, self.stride)


class Unit3D(nn.Module):
    """Conv3d (same padding, no bias) -> BatchNorm3d -> ReLU; the logits unit has a bias and neither."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: Triple = (1, 1, 1),
        stride: Triple = (1, 1, 1),
        *,
        eps: float = 1e-5,
        bn_relu: bool = True,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.bn_relu = kernel, stride, bn_relu
        self.conv3d = nn.Conv3d(c_in, c_out, kernel, stride, padding=0, bias=not bn_relu)
        if bn_relu:
            self.bn = nn.BatchNorm3d(c_out, eps=eps, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(F.pad(x, _same_pad(tuple(x.shape[2:]), self.kernel, self.stride)))
        return F.relu(self.bn(x)) if self.bn_relu else x


class InceptionBlock(nn.Module):
    """Four branches: 1x1 | 1x1->3x3 | 1x1->3x3 | maxpool3->1x1, concatenated on channels."""

    def __init__(self, c_in: int, c: tuple[int, int, int, int, int, int], eps: float) -> None:
        super().__init__()
        k1, k3 = (1, 1, 1), (3, 3, 3)
        self.b0 = Unit3D(c_in, c[0], k1, eps=eps)
        self.b1a = Unit3D(c_in, c[1], k1, eps=eps)
        self.b1b = Unit3D(c[1], c[2], k3, eps=eps)
        self.b2a = Unit3D(c_in, c[3], k1, eps=eps)
        self.b2b = Unit3D(c[3], c[4], k3, eps=eps)
        self.b3a = SamePadMaxPool3d(k3, (1, 1, 1))
        self.b3b = Unit3D(c_in, c[5], k1, eps=eps)
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, in_channels, branch widths) of the nine Inception blocks; pools sit before 4b and 5b.
_BLOCKS = (
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
)


class I3D(nn.Module):
    """Kinetics I3D: (B, 3, T, H, W) in [-1, 1] -> (B, num_classes) logits averaged over positions."""

    def __init__(self, config: I3DConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or I3DConfig()
        eps = cfg.bn_eps
        self.Conv3d_1a_7x7 = Unit3D(cfg.in_channels, 64, (7, 7, 7), (2, 2, 2), eps=eps)
        self.MaxPool3d_2a_3x3 = SamePadMaxPool3d((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64, eps=eps)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3), eps=eps)
        self.MaxPool3d_3a_3x3 = SamePadMaxPool3d((1, 3, 3), (1, 2, 2))
        pools = {"Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3)), "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2))}
        self.order = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3", "MaxPool3d_3a_3x3"]
        for name, c_in, widths in _BLOCKS:
            if name in pools:
                pool_name, k = pools[name]
                self.add_module(pool_name, SamePadMaxPool3d(k, (2, 2, 2)))
                self.order.append(pool_name)
            self.add_module(name, InceptionBlock(c_in, widths, eps))
            self.order.append(name)
        self.logits = Unit3D(1024, cfg.num_classes, bn_relu=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> Mixed_5c output (B, 1024, T/8, H/32, W/32) (ceil)."""
        for name in self.order:
            x = getattr(self, name)(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        t, h, w = x.shape[2:]
        x = F.avg_pool3d(x, (min(2, t), min(7, h), min(7, w)), stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))  # (B, num_classes)

    def train(self, mode: bool = True) -> I3D:
        """A frozen feature network: stays in eval mode (batch norm uses its running statistics)."""
        return super().train(False)

    @classmethod
    def from_checkpoint(cls, path: str | Path, config: I3DConfig | None = None) -> I3D:
        """Strictly load a PyTorch I3D state dict (e.g. ``i3d_pretrained_400.pt``)."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"I3D weights not found: {p} (expected a state dict such as i3d_pretrained_400.pt)")
        state = torch.load(p, map_location="cpu", weights_only=True)
        model = cls(config)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"I3D weights {p} do not match the InceptionI3d layout: {e}") from None
        return model.requires_grad_(False).eval()

    @classmethod
    def random(cls, seed: int = 0, config: I3DConfig | None = None) -> I3D:
        """Seeded random weights of the real architecture (He-normal convs, default batch norm); for tests."""
        g = torch.Generator().manual_seed(seed)
        with torch.device("meta"):  # skip the default init: every tensor is set below
            model = cls(config)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm3d):
                    m.reset_parameters()  # weight 1, bias 0, running mean 0 / var 1
            for name, p in model.named_parameters():
                if name.endswith("conv3d.weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p[0].numel()) ** 0.5)
                elif name == "logits.conv3d.bias":
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        return model.requires_grad_(False).eval()


__all__ = ["I3D", "I3DConfig", "InceptionBlock", "Unit3D", "SamePadMaxPool3d"]
