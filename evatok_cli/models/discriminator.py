"""Transformer PatchGAN discriminator (PAPER §2: "the transformer PatchGAN from LARP").

A video (B, 3, F, H, W) is cut into 3D patches, embedded linearly with learned position
embeddings, mixed by a few pre-norm transformer layers (full attention: the discriminator may look
at the whole clip, it never runs at inference), and every patch gets one real/fake logit. The loss
is averaged over patches, which is what makes it a *patch* GAN.

Losses (hinge, as in VQGAN/LARP): the discriminator minimises ``relu(1 - D(x)) + relu(1 + D(x̂))``,
the generator minimises ``-D(x̂)``. A small LeCam-style logit penalty is available to keep the
logits bounded (``logit_penalty``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(kw_only=True)
class DiscriminatorConfig:
    frames: int
    height: int
    width: int
    temporal_patch: int = 2
    spatial_patch: int = 8
    dim: int = 128
    depth: int = 2
    heads: int = 4

    def __post_init__(self) -> None:
        if self.frames % self.temporal_patch or self.height % self.spatial_patch or self.width % self.spatial_patch:
            raise ValueError(
                f"clip {self.frames}x{self.height}x{self.width} does not split into "
                f"{self.temporal_patch}x{self.spatial_patch}x{self.spatial_patch} patches"
            )
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.frames // self.temporal_patch, self.height // self.spatial_patch, self.width // self.spatial_patch)


class PatchDiscriminator(nn.Module):
    """(B, 3, F, H, W) in [-1, 1] -> (B, N_patches) logits."""

    def __init__(self, config: DiscriminatorConfig) -> None:
        super().__init__()
        self.config = c = config
        pt, ps = c.temporal_patch, c.spatial_patch
        self.embed = nn.Conv3d(3, c.dim, kernel_size=(pt, ps, ps), stride=(pt, ps, ps))
        n = c.grid[0] * c.grid[1] * c.grid[2]
        self.pos = nn.Parameter(torch.randn(1, n, c.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            c.dim, c.heads, dim_feedforward=4 * c.dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.embed(video)  # (B, D, t, h, w)
        x = x.flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        x = self.norm(self.blocks(x))
        return self.head(x).squeeze(-1)  # (B, N)


def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def g_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def logit_penalty(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Squared logits, a simple guard against logit divergence (used with a small weight)."""
    return logits_real.pow(2).mean() + logits_fake.pow(2).mean()


DISCRIMINATOR_PRESETS: dict[str, dict] = {
    "tiny": dict(temporal_patch=2, spatial_patch=8, dim=32, depth=1, heads=2),
    "small": dict(temporal_patch=4, spatial_patch=8, dim=96, depth=2, heads=4),
    "paper": dict(temporal_patch=4, spatial_patch=16, dim=512, depth=6, heads=8),
}


def discriminator_for(preset: str, frames: int, height: int, width: int) -> PatchDiscriminator:
    """The discriminator preset matching a tokenizer preset's clip geometry."""
    return PatchDiscriminator(
        DiscriminatorConfig(frames=frames, height=height, width=width, **DISCRIMINATOR_PRESETS[preset])
    )
