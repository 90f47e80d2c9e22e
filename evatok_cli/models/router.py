"""The EVATok router: a ViT that predicts a clip's token assignment in one forward pass (EVATok §3.3).

video (B, 3, F, H, W) in [-1, 1]
  [-> spatial area pooling by ``input_downsample``; 1 (off) in the paper preset, an option of ours]
  -> 3D patches (temporal_patch x spatial_patch^2) -> linear embedding + factorized 3D positions
  -> [CLS] prepended -> ``depth`` pre-norm transformer layers (full attention)
  -> LayerNorm(CLS) -> linear head over the m^T assignments of the space

Two heads share the body (PAPER §4 speaks only of the first):

- ``classify``: logits over the m^T joint assignment classes (one class per clip, not per block);
  trained with cross-entropy on the searched argmax label (or soft targets).
- ``reward``: regresses the per-assignment quality z-scores Q (m^T,); the quality/length trade-off
  (w_q, w_l) or a token budget is then chosen at inference (``evatok_cli.route``). Two forms:
  ``joint`` (one output per assignment) and ``blocks`` (one output u[t, k] per block and level, with
  Q(a) = mean_t u[t, a_t]: T*m = 20 numbers instead of 625). The clip metric is a mean over frames
  and the block-causal tokenizer makes block t's quality depend on the blocks before it only a
  little, so Q is close to additive over blocks; ``blocks`` builds that in and learns it from
  every explored assignment of every clip at once.

Routing policies (argmax of a reward, budgets) live outside the module (STYLE rule 9).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.models.modeldir import load_as, register_model_kind, save_model
from evatok_cli.models.qformer import PatchLayer, PosEmbed3D, init_linear, patchify

HEADS = ("classify", "reward")
REWARD_FORMS = ("joint", "blocks")


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Architecture of a :class:`Router` (defaults: the paper's ViT-S body, ~21.8M params, unpooled).

    The clip geometry (``frames``, ``height``, ``width``) and the space (``levels``, ``blocks``)
    come from the labels store it is trained on; the rest from a preset (:data:`ROUTER_PRESETS`).

    Args:
        frames, height, width: clip geometry (F, H, W).
        temporal_patch, spatial_patch: 3D patch size (pt, ps) on the pooled frames; F % pt == 0 and
            H, W multiples of ps * input_downsample.
        input_downsample: spatial area-pooling factor d applied to the frames before the patches:
            (F/pt) x (H/(d*ps)) x (W/(d*ps)) tokens. 1 (no pooling) in configs saved before it existed.
        dim, depth, heads, mlp_ratio: transformer width, layers, attention heads, MLP expansion.
        levels, blocks: the assignment space (m levels, T blocks): the head has m**T outputs.
        head: ``classify`` (logits) or ``reward`` (predicted quality z-scores Q).
        reward_form: reward head only: ``joint`` (m**T outputs) or ``blocks`` (T*m outputs averaged
            over blocks; see the module docstring).
    """

    frames: int = 16
    height: int = 128
    width: int = 128
    temporal_patch: int = 4
    spatial_patch: int = 8
    input_downsample: int = 1
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    levels: tuple[int, ...] = (32, 64, 128, 256, 512)
    blocks: int = 4
    head: str = "classify"
    reward_form: str = "joint"

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(k) for k in self.levels))
        for name in (
            "frames",
            "height",
            "width",
            "temporal_patch",
            "spatial_patch",
            "input_downsample",
            "dim",
            "depth",
            "heads",
            "blocks",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RouterConfig.{name} must be a positive int, got {v!r}")
        if self.frames % self.temporal_patch:
            raise ValueError(f"frames={self.frames} is not a multiple of temporal_patch={self.temporal_patch}")
        cell = self.spatial_patch * self.input_downsample
        if self.height % cell or self.width % cell:
            raise ValueError(
                f"height/width {self.height}x{self.width} not multiples of spatial_patch * input_downsample"
                f" = {self.spatial_patch} * {self.input_downsample}"
            )
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.reward_form not in REWARD_FORMS:
            raise ValueError(f"reward_form must be one of {REWARD_FORMS}, got {self.reward_form!r}")
        if self.reward_form != "joint" and self.head != "reward":
            raise ValueError(f"reward_form={self.reward_form!r} needs head='reward', got head={self.head!r}")
        AssignmentSpace(self.levels, self.blocks)  # validates the levels

    @property
    def space(self) -> AssignmentSpace:
        return AssignmentSpace(self.levels, self.blocks)

    @property
    def num_assignments(self) -> int:
        """m**T, the width of the head."""
        return len(self.levels) ** self.blocks

    @property
    def grid(self) -> tuple[int, int, int]:
        """(t, h, w) patches."""
        cell = self.spatial_patch * self.input_downsample
        return self.frames // self.temporal_patch, self.height // cell, self.width // cell

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch * self.spatial_patch**2


# ------------------------------------------------------------------------------------- model
@register_model_kind("router", RouterConfig)
class Router(nn.Module):
    """ViT router over 3D patches + [CLS]; see the module docstring."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        c = self.config = config
        t, h, w = c.grid
        self.patch_embed = nn.Linear(c.patch_dim, c.dim)
        self.pos = PosEmbed3D(t, h, w, c.dim, "factorized")
        self.cls = nn.Parameter(torch.randn(1, 1, c.dim) * 0.02)
        self.layers = nn.ModuleList(PatchLayer(c.dim, c.heads, c.mlp_ratio) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.dim)
        blocks = c.reward_form == "blocks"
        self.head = nn.Linear(c.dim, c.blocks * len(c.levels) if blocks else c.num_assignments)
        if blocks:  # (m**T, T): the column of u[t, a_t] in the flat (T*m) head output, per assignment
            table = torch.as_tensor(c.space.table()).long()  # (m**T, T) levels
            level_idx = torch.searchsorted(torch.tensor(c.levels), table)
            self.register_buffer("block_cols", level_idx + torch.arange(c.blocks) * len(c.levels), persistent=False)
        self.apply(init_linear)
        nn.init.zeros_(self.head.weight)  # start from uniform logits / Q-hat = 0 (the z-score mean)

    @property
    def space(self) -> AssignmentSpace:
        return self.config.space

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, video: Tensor) -> Tensor:
        """Training pass: (B, 3, F, H, W) in [-1, 1] -> (B, m**T) logits (classify) or Q-hat (reward)."""
        c = self.config
        if video.dim() != 5 or tuple(video.shape[1:]) != (3, c.frames, c.height, c.width):
            raise ValueError(f"expected video (B, 3, {c.frames}, {c.height}, {c.width}), got {tuple(video.shape)}")
        if c.input_downsample > 1:  # area pooling: (B, 3, F, H/d, W/d)
            video = nn.functional.avg_pool3d(video, (1, c.input_downsample, c.input_downsample))
        x = self.patch_embed(patchify(video, c.temporal_patch, c.spatial_patch)) + self.pos()  # (B, N, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1)  # (B, 1 + N, D)
        for layer in self.layers:
            x = layer(x, None)
        out = self.head(self.norm(x[:, 0]))  # (B, m**T), or (B, T*m) per-block qualities u
        if self.config.reward_form == "blocks":
            out = out[:, self.block_cols].mean(-1)  # (B, m**T, T) -> (B, m**T): Q(a) = mean_t u[t, a_t]
        return out

    @torch.no_grad()
    def predict(self, video: Tensor) -> Tensor:
        """Inference pass (no grad, float32 out): logits or Q-hat (B, m**T). Call ``.eval()`` first."""
        return self(video).float()

    # ------------------------------------------------------------------------ save / load
    def save_pretrained(
        self,
        path: str | Path,
        *,
        preset: str | None = None,
        ema: nn.Module | dict[str, Tensor] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Path:
        """Write a model directory (config.json + model.safetensors [+ ema.safetensors]) of kind ``router``."""
        return save_model(
            path, self, self.config, kind="router", preset=preset or getattr(self, "preset", None), ema=ema, extra=extra
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, *, ema: bool = True, map_location: str | torch.device = "cpu") -> Router:
        """Load a ``router`` model directory (EMA weights when present and ``ema``), in eval mode."""
        return load_as(cls, path, ema=ema, map_location=map_location)


# ----------------------------------------------------------------------------------- presets
# Architectures; the clip geometry and the space are replaced by those of the labels store.
ROUTER_PRESETS: dict[str, RouterConfig] = {
    # the tiny tokenizer's 8x32x32 clips, levels {1..16}: 2x16x16 patches (4 per block) -> 16 tokens; 0.1M params.
    "tiny": RouterConfig(
        frames=8,
        height=32,
        width=32,
        temporal_patch=2,
        spatial_patch=16,
        dim=32,
        depth=2,
        heads=2,
        levels=(1, 2, 4, 8, 16),
        blocks=4,
    ),
    # the small tokenizer's 16x64x64 clips, levels {8..128}: 4x16x16 patches (one per block) -> 64 tokens; 0.8M params.
    "small": RouterConfig(
        frames=16,
        height=64,
        width=64,
        temporal_patch=4,
        spatial_patch=16,
        dim=96,
        depth=4,
        heads=2,
        levels=(8, 16, 32, 64, 128),
        blocks=4,
    ),
    # ViT-S (PAPER §4: "19.9M"): the full 16x128x128 clip, 4x8x8 patches -> 1024 tokens, 625 classes: 21.8M
    # (a dim-384 depth-12 ViT body alone is 21.3M). router_config("paper", input_downsample=4) pools the frames
    # 4x first (64 tokens instead of 1024; docs/pipeline.md "Router").
    "paper": RouterConfig(),
}


def router_config(name: str, **overrides: Any) -> RouterConfig:
    """A preset by name, optionally with fields replaced (e.g. the labels' geometry and space, ``head``)."""
    if name not in ROUTER_PRESETS:
        raise KeyError(f"unknown router preset {name!r} (known: {', '.join(ROUTER_PRESETS)})")
    return dataclasses.replace(ROUTER_PRESETS[name], **overrides)
