"""Building blocks of the EVATok tokenizer: patchify, 3D position embeddings, query pooling and
the pre-norm transformer / Q-Former layers (EVATok §3.1).

Layers expose their key/value projections (``self_kv``, ``cross_kv``) separately from the
attention itself so that the tokenizer can run them on a whole packed clip *or* block by block
with caches of earlier blocks (see ``tokenizer.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evatok_cli.models.attention import Attention


# --------------------------------------------------------------------------------- patchify
def init_linear(m: nn.Module) -> None:
    """ViT-style init for ``module.apply``: truncated-normal (std 0.02) Linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def patchify(video: Tensor, pt: int, ps: int) -> Tensor:
    """(B, 3, F, H, W) -> (B, T*h*w, 3*pt*ps*ps), block-major then row-major patches."""
    B, C, F, H, W = video.shape
    x = video.reshape(B, C, F // pt, pt, H // ps, ps, W // ps, ps)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # (B, T, h, w, C, pt, ps, ps)
    return x.reshape(B, (F // pt) * (H // ps) * (W // ps), C * pt * ps * ps)


def depatchify(x: Tensor, blocks: int, h: int, w: int, pt: int, ps: int) -> Tensor:
    """(B, blocks*h*w, 3*pt*ps*ps) -> (B, 3, blocks*pt, h*ps, w*ps)."""
    B = x.shape[0]
    x = x.reshape(B, blocks, h, w, 3, pt, ps, ps)
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # (B, 3, T, pt, h, ps, w, ps)
    return x.reshape(B, 3, blocks * pt, h * ps, w * ps)


# --------------------------------------------------------------------------- query pooling
def query_grid(n: int, h: int, w: int) -> tuple[int, int]:
    """Largest pooling grid (gh, gw), gh <= h, gw <= w, with gh*gw <= n; ties: closest to h:w."""
    best = (1, 1)
    for gh in range(1, h + 1):
        gw = min(w, n // gh)
        if gw < 1:
            break
        cand, cur = gh * gw, best[0] * best[1]
        if cand > cur or (cand == cur and abs(gh / gw - h / w) < abs(best[0] / best[1] - h / w)):
            best = (gh, gw)
    return best


def _avg_pool_matrix(size: int, out: int) -> list[list[float]]:
    """(out, size) weights of 1-D adaptive average pooling (torch's bin edges)."""
    rows = []
    for i in range(out):
        lo, hi = (i * size) // out, -((-(i + 1) * size) // out)
        rows.append([1.0 / (hi - lo) if lo <= j < hi else 0.0 for j in range(size)])
    return rows


def query_pool_matrix(k: int, h: int, w: int) -> Tensor:
    """(k, h*w) linear map from a block's patch features to its k query seeds.

    The block's (h, w) feature grid is adaptive-average-pooled to ``query_grid(min(k, h*w), h, w)``
    = G cells (the "2D pooling feature of the block"), and query i takes cell ``i * G // k``: when
    k > G (e.g. 512 queries over 16x16 patches) consecutive queries share a cell and only their
    learned embeddings tell them apart.
    """
    gh, gw = query_grid(min(k, h * w), h, w)
    ph, pw = _avg_pool_matrix(h, gh), _avg_pool_matrix(w, gw)
    cells = [[a * b for a in ph[i] for b in pw[j]] for i in range(gh) for j in range(gw)]  # (G, h*w)
    G = gh * gw
    return torch.tensor([cells[(i * G) // k] for i in range(k)], dtype=torch.float32)


# ---------------------------------------------------------------------------- embeddings
class PosEmbed3D(nn.Module):
    """Learned 3D position embeddings over the (T, h, w) patch grid.

    ``factorized``: e_t + e_y + e_x ((T + h + w) * dim parameters); ``learned``: one vector per
    position (T * h * w * dim parameters).
    """

    def __init__(self, blocks: int, h: int, w: int, dim: int, mode: str) -> None:
        super().__init__()
        self.shape = (blocks, h, w)
        self.mode = mode
        if mode == "learned":
            self.table = nn.Parameter(torch.randn(blocks * h * w, dim) * 0.02)
        elif mode == "factorized":
            self.t = nn.Parameter(torch.randn(blocks, dim) * 0.02)
            self.y = nn.Parameter(torch.randn(h, dim) * 0.02)
            self.x = nn.Parameter(torch.randn(w, dim) * 0.02)
        else:
            raise ValueError(f"unknown position embedding mode {mode!r}")

    def forward(self) -> Tensor:
        """(T*h*w, dim) embeddings in block-major order."""
        if self.mode == "learned":
            return self.table
        T, h, w = self.shape
        e = self.t[:, None, None] + self.y[None, :, None] + self.x[None, None, :]  # (T, h, w, dim)
        return e.reshape(T * h * w, -1)

    def block(self, t: int) -> Tensor:
        """(h*w, dim) embeddings of block t."""
        _, h, w = self.shape
        return self()[t * h * w : (t + 1) * h * w]


# --------------------------------------------------------------------------------- layers
class MLP(nn.Module):
    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchLayer(nn.Module):
    """Pre-norm transformer layer over patches (block-causal self-attention + MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        h = self.norm1(x)
        k, v = self.attn.kv(h)
        x = x + self.attn(h, k, v, mask)
        return x + self.mlp(self.norm2(x))


class QFormerLayer(nn.Module):
    """Q-Former layer: self-attention among queries, cross-attention to a context, MLP (pre-norm).

    Used as ``k, v = layer.self_kv(x); x = layer.attend_self(x, k, v, m)``, then
    ``x = layer.attend_cross(x, *layer.cross_kv(ctx), m2)`` and ``x = layer.ffn(x)``; keys and
    values can be concatenated with caches in between.
    """

    def __init__(self, dim: int, heads: int, ctx_dim: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(ctx_dim)
        self.cross_attn = Attention(dim, heads, kv_dim=ctx_dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_ratio)

    def self_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.self_attn.kv(self.norm_self(x))

    def cross_kv(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        return self.cross_attn.kv(self.norm_ctx(ctx))

    def attend_self(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return x + self.self_attn(self.norm_self(x), k, v, mask)

    def attend_cross(self, x: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return x + self.cross_attn(self.norm_cross(x), k, v, mask)

    def ffn(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm_mlp(x))
