"""Semantic terms of the full recipe (EVATok §2 Eq. 1-2, §5): V-JEPA2 alignment, VideoMAE discriminator.

**Alignment** (:class:`AlignmentHook`, weight lambda = 0.7 in the paper)::

    L_align = -mean_n cos(phi(f_dec,l)_n, f_teacher_n)

over every patch n of every clip, with f_dec,l the (B, T, h, w, D_dec) output of decoder layer l
(the tokenizer's ``dec_feature_layer``; our presets use the middle layer: 6 of 12 for ``paper``)
and f_teacher the frozen V-JEPA2's output patch features on the teacher grid (t', h', w'). phi is a
small MLP followed by a *depatchify* to the teacher grid: when the teacher grid is an integer
multiple of the decoder grid (the paper: 4x16x16 decoder patches, 8x16x16 V-JEPA2 patches for
16x256x256 input) the MLP emits ``rt*rh*rw`` vectors per decoder patch, rearranged into the finer
grid; otherwise it emits one vector that is resized trilinearly. (The paper writes phi on the
teacher side; we put it on the decoder side, as REPA does, so that the teacher's target stays fixed
and phi cannot collapse it.)

**Semantic discriminator** (:class:`SemanticDiscriminator`): the frozen VideoMAE's hidden states
of a few layers (default: four evenly spaced ones ending at the last, e.g. 3, 6, 9, 12 for
VideoMAE-B) each go through a trainable 1D-CNN head over the token sequence that gives one
real/fake logit per token. The paper warns that such discriminators can make the logits diverge
(the reason it did not use the larger V-JEPA2 for it); the guards, and why:

- **hinge loss** (``d_hinge_loss``): the discriminator gains nothing by pushing logits past +-1;
- **spectral norm** on every head convolution and a parameter-free LayerNorm on the teacher
  features: each head is 1-Lipschitz in normalised features, so logits grow only with the features;
- **LeCam regularisation** (:meth:`SemanticDiscriminator.lecam`): real logits are pulled towards an
  EMA of the fake ones and vice versa, which keeps the two from running apart;
- **gradient clipping** on the heads (the task clips them to ``grad_clip``), and a **fixed generator
  weight** (no VQGAN adaptive weight: its ratio of gradient norms explodes exactly when the
  adversarial gradient vanishes, so there is nothing to cap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

from evatok_cli.models.teachers import VideoTeacher

Grid = tuple[int, int, int]


# ------------------------------------------------------------------------------------ alignment
class AlignmentProjector(nn.Module):
    """phi: decoder features (B, T, h, w, D_dec) -> (B, t', h', w', D_teacher)."""

    def __init__(
        self, dec_width: int, teacher_dim: int, dec_grid: Grid, teacher_grid: Grid, hidden: int | None = None
    ) -> None:
        super().__init__()
        self.dec_grid, self.teacher_grid, self.teacher_dim = tuple(dec_grid), tuple(teacher_grid), teacher_dim
        exact = all(t % d == 0 for t, d in zip(teacher_grid, dec_grid))
        self.ratio: Grid | None = tuple(t // d for t, d in zip(teacher_grid, dec_grid)) if exact else None  # type: ignore[assignment]
        out = teacher_dim * (math.prod(self.ratio) if self.ratio else 1)
        hidden = hidden or 2 * max(dec_width, teacher_dim)
        self.mlp = nn.Sequential(
            nn.Linear(dec_width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, T, h, w, _ = x.shape
        if (T, h, w) != self.dec_grid:
            raise ValueError(f"decoder features have grid {(T, h, w)}, phi was built for {self.dec_grid}")
        y = self.mlp(x)  # (B, T, h, w, r*Dt)
        if self.ratio is not None:  # depatchify
            rt, rh, rw = self.ratio
            y = y.view(b, T, h, w, rt, rh, rw, self.teacher_dim)
            y = y.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, T * rt, h * rh, w * rw, self.teacher_dim)
            return y  # (B, t', h', w', Dt)
        y = F.interpolate(y.permute(0, 4, 1, 2, 3), size=self.teacher_grid, mode="trilinear", align_corners=False)
        return y.permute(0, 2, 3, 4, 1)  # (B, t', h', w', Dt)


def alignment_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean cosine similarity over every patch of every clip (EVATok Eq. 2)."""
    return -F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


class AlignmentHook(nn.Module):
    """``hook(video, dec_features) -> L_align`` for :class:`~evatok_cli.train.tokenizer.TokenizerTask`.

    Only phi is a parameter of this module (trained with the tokenizer, saved in its train state);
    the teacher is held outside the module tree (frozen, loaded from its own directory).

    Args:
        teacher: a frozen V-JEPA2 (or any :class:`VideoTeacher`).
        dec_width: the tokenizer's ``dec_width``.
        dec_grid: the decoder feature grid (T, h, w) = (blocks, height/ps, width/ps).
        frames: clip frames (sets the teacher's temporal grid).
        hidden: phi's hidden width (default ``2 * max(dec_width, teacher dim)``).
    """

    def __init__(
        self, teacher: VideoTeacher, dec_width: int, dec_grid: Grid, frames: int, hidden: int | None = None
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.proj = AlignmentProjector(dec_width, teacher.hidden_size, dec_grid, teacher.grid(frames), hidden)
        self.last_metrics: dict[str, float] = {}

    @classmethod
    def for_tokenizer(cls, teacher: VideoTeacher, config, hidden: int | None = None) -> AlignmentHook:
        """The hook matching a :class:`~evatok_cli.models.tokenizer.TokenizerConfig`."""
        return cls(teacher, config.dec_width, (config.blocks, *config.grid), config.frames, hidden)

    def forward(self, video: torch.Tensor, dec_features: torch.Tensor | None) -> torch.Tensor:
        if dec_features is None:
            raise ValueError("the alignment loss needs decoder features: the tokenizer has dec_feature_layer=0")
        (target,) = self.teacher.to(video.device)(video)  # (B, t', h', w', Dt), no grad
        loss = alignment_loss(self.proj(dec_features.float()), target)
        self.last_metrics = {"align_teacher_s": self.teacher.last_time_s}
        return loss


# ---------------------------------------------------------------------- semantic discriminator
def default_disc_layers(num_layers: int, count: int = 4) -> tuple[int, ...]:
    """``count`` evenly spaced 1-based layers ending at the last (12 layers -> 3, 6, 9, 12)."""
    return tuple(sorted({max(1, round(num_layers * (i + 1) / count)) for i in range(count)}))


class DiscHead(nn.Module):
    """A 1D CNN over one layer's token sequence: (B, N, D) -> (B, N) logits."""

    def __init__(self, dim: int, channels: int = 64, kernel: int = 9) -> None:
        super().__init__()
        self.dim = dim
        self.inp = spectral_norm(nn.Conv1d(dim, channels, 1))
        self.mix = spectral_norm(nn.Conv1d(channels, channels, kernel, padding=kernel // 2, padding_mode="circular"))
        self.out = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, (self.dim,))  # parameter-free: deeper layers have larger norms
        h = F.leaky_relu(self.inp(x.transpose(1, 2)), 0.2)  # (B, C, N)
        h = h + F.leaky_relu(self.mix(h), 0.2)
        return self.out(h).squeeze(1)  # (B, N)


class SemanticDiscriminator(nn.Module):
    """Frozen VideoMAE multi-layer features -> trainable 1D-CNN heads -> real/fake logits (EVATok §5).

    ``features(video, grad=...)`` runs the teacher; ``forward(features)`` runs the heads, so one
    teacher pass per clip serves both the generator and the discriminator update. Parameters: the
    heads only (plus the LeCam EMAs as buffers).

    Args:
        teacher: a frozen VideoMAE (or any :class:`VideoTeacher`).
        layers: 1-based teacher layers to read (default :func:`default_disc_layers`).
        channels, kernel: width and kernel size of each head's convolutions.
        lecam_decay: EMA decay of the mean real/fake logits used by :meth:`lecam`.
    """

    def __init__(
        self,
        teacher: VideoTeacher,
        layers: Sequence[int] | None = None,
        channels: int = 64,
        kernel: int = 9,
        lecam_decay: float = 0.99,
    ) -> None:
        super().__init__()
        self.teacher = teacher
        self.layers = tuple(layers) if layers else default_disc_layers(teacher.num_layers)
        if not all(1 <= layer <= teacher.num_layers for layer in self.layers):
            raise ValueError(f"layers {self.layers} outside 1..{teacher.num_layers}")
        self.heads = nn.ModuleList(DiscHead(teacher.hidden_size, channels, kernel) for _ in self.layers)
        self.lecam_decay = lecam_decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    def features(self, video: torch.Tensor, *, grad: bool) -> list[torch.Tensor]:
        """(B, 3, F, H, W) in [-1, 1] -> one (B, N, D) token sequence per layer (teacher frozen)."""
        feats = self.teacher.to(video.device)(video, layers=self.layers, grad=grad)
        return [f.flatten(1, 3) for f in feats]  # (B, t'*h'*w', D)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Per-token logits of every head, concatenated: (B, N_total)."""
        return torch.cat([head(f) for head, f in zip(self.heads, features)], dim=1)

    def lecam(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """LeCam regulariser (Tseng et al. 2021); updates the logit EMAs."""
        ema_real, ema_fake = self.ema_real.clone(), self.ema_fake.clone()  # the buffers change in place below
        reg = F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()
        with torch.no_grad():
            self.ema_real.lerp_(logits_real.detach().float().mean(), 1 - self.lecam_decay)
            self.ema_fake.lerp_(logits_fake.detach().float().mean(), 1 - self.lecam_decay)
        return reg
