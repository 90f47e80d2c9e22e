"""EVATok adaptive-length block-causal 1D video tokenizer (EVATok §3.1, supplementary K).

video (B, 3, F, H, W) in [-1, 1]
  -> linear patch embedding + 3D positions -> ``patch_depth`` block-causal layers  ("reference")
  -> Q-Former encoder: block t gets k_t queries seeded by pooling block t's reference grid
     (+ learned (level, index) and block embeddings); self-attn among queries, cross-attn to the
     reference, MLP, all block-causal
  -> l2-normalised VQ (codebook_size x code_dim)
  -> Q-Former decoder: one 3D query per patch, initialised from the first token of its block
     + 3D positions; self-attn among 3D queries, cross-attn to tokens (both block-causal), MLP
  -> linear depatchify -> (B, 3, F, H, W)

Every clip of a batch has its own assignment; tokens are packed per clip and padded (see
``attention.py``), so a clip's tokens do not depend on its batch-mates. ``encode_block`` /
``decode_block`` run one block against cached prefix states (``blockwise.py``). Choices the paper
leaves open are documented in docs/tokenizer.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.checkpoint import load_model, register_model_kind, save_model
from evatok_cli.models.attention import (
    additive_mask,
    block_causal_mask,
    locality_mask,
    packed_layout,
    padding_fraction,
    padding_mask,
    patch_block_ids,
)
from evatok_cli.models.blockwise import DecoderState, EncoderState
from evatok_cli.models.qformer import (
    PatchLayer,
    PosEmbed3D,
    QFormerLayer,
    depatchify,
    init_linear,
    patchify,
    query_pool_matrix,
)
from evatok_cli.models.quantizer import VectorQuantizer


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True, kw_only=True)
class TokenizerConfig:
    """Architecture of an :class:`EVATokTokenizer` (defaults: the paper's S-B, ~145M params)."""

    frames: int = 16
    height: int = 128
    width: int = 128
    temporal_patch: int = 4
    spatial_patch: int = 8
    levels: tuple[int, ...] = (32, 64, 128, 256, 512)
    enc_width: int = 512  # reference layers and Q-Former encoder
    enc_heads: int = 8
    patch_depth: int = 2  # block-causal transformer layers over patches ("reference" features)
    enc_depth: int = 6  # Q-Former encoder layers
    dec_width: int = 768
    dec_heads: int = 12
    dec_depth: int = 12
    mlp_ratio: float = 4.0
    codebook_size: int = 16384
    code_dim: int = 8
    commit_beta: float = 0.25
    entropy_temperature: float = 0.01
    query_init: str = "pool"  # "pool": pooled block features + learned; "learned": learned only
    pos_embed: str = "factorized"  # "factorized" (t + y + x) or "learned" (one per position)
    dec_feature_layer: int = 6  # decoder layer (1-based) whose output is exposed; 0 = none
    dec_locality_bias: float = 4.0  # initial learned cross-attn bias towards covering tokens; 0 = off
    nearest_chunk: int = 4096  # tile size of the nearest-code search

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(k) for k in self.levels))
        pt, ps = self.temporal_patch, self.spatial_patch
        for name in ("frames", "height", "width", "temporal_patch", "spatial_patch", "enc_width", "enc_heads",
                     "enc_depth", "dec_width", "dec_heads", "dec_depth", "codebook_size", "code_dim",
                     "nearest_chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TokenizerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.frames % pt:
            raise ValueError(f"frames={self.frames} is not a multiple of temporal_patch={pt}")
        if self.height % ps or self.width % ps:
            raise ValueError(f"height/width {self.height}x{self.width} not multiples of spatial_patch={ps}")
        AssignmentSpace(self.levels, self.frames // pt)  # validates the levels
        if self.patch_depth < 0:
            raise ValueError(f"patch_depth must be >= 0, got {self.patch_depth}")
        if self.enc_width % self.enc_heads or self.dec_width % self.dec_heads:
            raise ValueError("enc_width/dec_width must be divisible by enc_heads/dec_heads")
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.query_init not in ("pool", "learned"):
            raise ValueError(f"query_init must be 'pool' or 'learned', got {self.query_init!r}")
        if self.pos_embed not in ("factorized", "learned"):
            raise ValueError(f"pos_embed must be 'factorized' or 'learned', got {self.pos_embed!r}")
        if not 0 <= self.dec_feature_layer <= self.dec_depth:
            raise ValueError(f"dec_feature_layer must be in [0, {self.dec_depth}], got {self.dec_feature_layer}")
        if self.dec_locality_bias < 0:
            raise ValueError(f"dec_locality_bias must be >= 0, got {self.dec_locality_bias}")
        if self.mlp_ratio <= 0 or self.commit_beta < 0 or self.entropy_temperature <= 0:
            raise ValueError("mlp_ratio and entropy_temperature must be > 0 and commit_beta >= 0")

    @property
    def blocks(self) -> int:
        return self.frames // self.temporal_patch

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w) patches per frame."""
        return self.height // self.spatial_patch, self.width // self.spatial_patch

    @property
    def patches_per_block(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch * self.spatial_patch**2

    @property
    def space(self) -> AssignmentSpace:
        return AssignmentSpace(self.levels, self.blocks)


# ------------------------------------------------------------------------------------- model
@dataclass
class TokenizerOutput:
    """What :meth:`EVATokTokenizer.forward` returns."""

    recon: Tensor  # (B, 3, F, H, W)
    indices: Tensor  # (B, L) packed token ids per clip, -1 on padding
    block_lengths: Tensor  # (B, T)
    losses: dict[str, Tensor]  # codebook, commitment, vq (= codebook + beta*commitment), entropy, l1, mse
    stats: dict[str, Tensor]  # usage, perplexity, padding_fraction (detached 0-d)
    dec_features: Tensor | None  # (B, T, h, w, dec_width) output of decoder layer dec_feature_layer


@register_model_kind("tokenizer", TokenizerConfig)
class EVATokTokenizer(nn.Module):
    """Adaptive-length block-causal 1D video tokenizer. See the module docstring."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        c = self.config = config
        T, (h, w), De, Dd = c.blocks, c.grid, c.enc_width, c.dec_width
        n_rows = sum(c.levels)
        self.patch_embed = nn.Linear(c.patch_dim, De)
        self.enc_pos = PosEmbed3D(T, h, w, De, c.pos_embed)
        self.patch_layers = nn.ModuleList(PatchLayer(De, c.enc_heads, c.mlp_ratio) for _ in range(c.patch_depth))
        self.ref_norm = nn.LayerNorm(De)
        self.query_proj = nn.Linear(De, De) if c.query_init == "pool" else None
        self.query_embed = nn.Parameter(torch.randn(n_rows, De) * 0.02)  # one per (level, index)
        self.query_block_embed = nn.Parameter(torch.randn(T, De) * 0.02)
        self.enc_layers = nn.ModuleList(QFormerLayer(De, c.enc_heads, De, c.mlp_ratio) for _ in range(c.enc_depth))
        self.enc_norm = nn.LayerNorm(De)
        self.quant_in = nn.Linear(De, c.code_dim)
        self.quantizer = VectorQuantizer(c.codebook_size, c.code_dim, beta=c.commit_beta,
                                         entropy_temperature=c.entropy_temperature, chunk_size=c.nearest_chunk)
        self.token_proj = nn.Linear(c.code_dim, Dd)
        self.token_embed = nn.Parameter(torch.randn(n_rows, Dd) * 0.02)
        self.token_block_embed = nn.Parameter(torch.randn(T, Dd) * 0.02)
        self.dec_init = nn.Linear(Dd, Dd)
        self.dec_pos = PosEmbed3D(T, h, w, Dd, c.pos_embed)
        self.dec_layers = nn.ModuleList(QFormerLayer(Dd, c.dec_heads, Dd, c.mlp_ratio) for _ in range(c.dec_depth))
        # One learned scalar per decoder layer: extra attention logit from a 3D query to the tokens of
        # its own block whose pooling cell covers its position (docs/tokenizer.md, "locality bias").
        self.dec_local_bias = (nn.Parameter(torch.full((c.dec_depth,), float(c.dec_locality_bias)))
                               if c.dec_locality_bias > 0 else None)
        self.dec_norm = nn.LayerNorm(Dd)
        self.to_pixels = nn.Linear(Dd, c.patch_dim)
        # Derived constants (not saved): pooling rows of every (level, index) and level -> row offset.
        offsets = [0]
        for k in c.levels[:-1]:
            offsets.append(offsets[-1] + k)
        level_offset = torch.full((c.levels[-1] + 1,), -1, dtype=torch.long)
        level_offset[list(c.levels)] = torch.tensor(offsets)
        self.register_buffer("level_offset", level_offset, persistent=False)
        self.register_buffer("pool_rows", torch.cat([query_pool_matrix(k, h, w) for k in c.levels]), persistent=False)
        self.register_buffer("patch_blocks", patch_block_ids(T, h * w), persistent=False)
        self.register_buffer("patch_pos", torch.arange(h * w).repeat(T), persistent=False)
        self.apply(init_linear)

    # ------------------------------------------------------------------------ properties
    @property
    def space(self) -> AssignmentSpace:
        return self.config.space

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def check_assignments(self, assignments: Tensor | Any, batch: int | None = None) -> Tensor:
        """Validate (B, T) per-block token counts; returns them as int64 on the model's device."""
        a = torch.as_tensor(assignments, dtype=torch.long, device=self.level_offset.device)
        T = self.config.blocks
        if a.dim() != 2 or a.shape[1] != T or (batch is not None and a.shape[0] != batch):
            want = f"({batch if batch is not None else 'B'}, {T})"
            raise ValueError(f"assignments must have shape {want}, got {tuple(a.shape)}")
        return self._check_levels(a)

    def _check_levels(self, a: Tensor) -> Tensor:
        top = self.config.levels[-1]
        bad = (a < 0) | (a > top) | (self.level_offset[a.clamp(0, top)] < 0)
        if bad.any():
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"token count {int(a[where])} at {where} is not a level {self.config.levels}")
        return a

    def _check_video(self, video: Tensor) -> None:
        c = self.config
        want = (3, c.frames, c.height, c.width)
        if video.dim() != 5 or tuple(video.shape[1:]) != want:
            raise ValueError(f"video must be (B, {', '.join(map(str, want))}), got {tuple(video.shape)}")

    # --------------------------------------------------------------------------- encoder
    def reference(self, video: Tensor) -> Tensor:
        """(B, 3, F, H, W) -> (B, N, enc_width) block-causal patch features (N = T*h*w)."""
        self._check_video(video)
        c = self.config
        x = self.patch_embed(patchify(video, c.temporal_patch, c.spatial_patch)) + self.enc_pos()
        mask = block_causal_mask(self.patch_blocks, self.patch_blocks) if self.patch_layers else None
        for layer in self.patch_layers:
            x = layer(x, mask)
        return self.ref_norm(x)

    def _query_seeds(self, pool: Tensor, ref: Tensor, rows: Tensor, blocks: Tensor | int) -> Tensor:
        """Initial queries: pooled ``ref`` ((B, L, n) @ (B, n, De)) + learned embeddings."""
        x = self.query_embed[rows] + self.query_block_embed[blocks]
        if self.query_proj is not None:
            x = x + self.query_proj(torch.bmm(pool, ref))
        return x

    def _encode_packed(self, ref: Tensor, block_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Run the Q-Former on packed queries -> ((B, L, code_dim) pre-quant tokens, (B, L) valid)."""
        c = self.config
        B, T, n = block_lengths.shape[0], c.blocks, c.patches_per_block
        bid, idx, valid = packed_layout(block_lengths)
        rows = self.level_offset[block_lengths.gather(1, bid)] + idx  # (B, L) (level, index) row
        pool = self.pool_rows[rows]  # (B, L, n); spread into its block's columns of the (B, L, T*n) map
        pool = (pool[:, :, None, :] * nn.functional.one_hot(bid, T)[..., None].to(pool.dtype)).reshape(B, -1, T * n)
        x = self._query_seeds(pool, ref, rows, bid)
        self_mask = block_causal_mask(bid, bid, valid, valid)
        cross_mask = block_causal_mask(bid, self.patch_blocks, valid)
        for layer in self.enc_layers:
            x = layer.attend_self(x, *layer.self_kv(x), self_mask)
            x = layer.attend_cross(x, *layer.cross_kv(ref), cross_mask)
            x = layer.ffn(x)
        return self.quant_in(self.enc_norm(x)), valid

    # --------------------------------------------------------------------------- decoder
    def _token_context(self, codes: Tensor, rows: Tensor, blocks: Tensor | int) -> Tensor:
        return self.token_proj(codes) + self.token_embed[rows] + self.token_block_embed[blocks]

    def _decode_packed(self, codes: Tensor, block_lengths: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, L, code_dim) packed codes -> ((B, 3, F, H, W) pixels, decoder features or None)."""
        c = self.config
        B, T, n, (h, w) = codes.shape[0], c.blocks, c.patches_per_block, c.grid
        bid, idx, valid = packed_layout(block_lengths, codes.shape[1])
        rows = self.level_offset[block_lengths.gather(1, bid)] + idx
        tok = self._token_context(codes, rows, bid)  # (B, L, Dd)
        first = (block_lengths.cumsum(1) - block_lengths)[..., None].expand(-1, -1, tok.shape[-1])
        seed = self.dec_init(tok.gather(1, first))  # (B, T, Dd) from each block's first token
        x = (seed[:, :, None, :] + self.dec_pos().view(T, n, -1)).reshape(B, T * n, -1)  # (B, N, Dd)
        self_mask = block_causal_mask(self.patch_blocks, self.patch_blocks)
        cross_mask = block_causal_mask(self.patch_blocks, bid, None, valid)
        local = locality_mask(self.patch_blocks, self.patch_pos, bid, self.pool_rows[rows] > 0)
        feats = None
        for i, layer in enumerate(self.dec_layers, start=1):
            x = layer.attend_self(x, *layer.self_kv(x), self_mask)
            x = layer.attend_cross(x, *layer.cross_kv(tok), self._cross_mask(cross_mask, local, i - 1, x.dtype))
            x = layer.ffn(x)
            if i == c.dec_feature_layer:
                feats = x.view(B, T, h, w, -1)
        pixels = self.to_pixels(self.dec_norm(x))
        return depatchify(pixels, T, h, w, c.temporal_patch, c.spatial_patch), feats

    def _cross_mask(self, allowed: Tensor, local: Tensor, layer: int, dtype: torch.dtype) -> Tensor:
        """Decoder cross-attention mask of one layer: bool, or float with the locality bias."""
        if self.dec_local_bias is None:
            return allowed
        return additive_mask(allowed, self.dec_local_bias[layer].to(dtype) * local.to(dtype))

    # ------------------------------------------------------------------------ public API
    def forward(self, video: Tensor, assignments: Tensor) -> TokenizerOutput:
        """Encode, quantize and reconstruct a batch, each clip with its own assignment.

        Args:
            video: (B, 3, F, H, W) in [-1, 1].
            assignments: (B, T) tokens per block, values from ``config.levels``.
        """
        lengths = self.check_assignments(assignments, video.shape[0])
        z, valid = self._encode_packed(self.reference(video), lengths)
        q = self.quantizer(z[valid])
        codes = torch.zeros_like(z).masked_scatter(valid[..., None], q.z_q.to(z.dtype))  # (B, L, code_dim)
        indices = torch.full(valid.shape, -1, dtype=torch.long, device=z.device).masked_scatter(valid, q.indices)
        recon, feats = self._decode_packed(codes, lengths)
        losses = dict(q.losses)
        losses["l1"] = (recon - video).abs().mean()
        losses["mse"] = ((recon - video) ** 2).mean()
        stats = {k: v.detach() for k, v in q.stats.items()}
        stats["padding_fraction"] = torch.tensor(padding_fraction(lengths))
        return TokenizerOutput(recon, indices, lengths, losses, stats, feats)

    @torch.no_grad()
    def encode(self, video: Tensor, assignments: Tensor) -> tuple[list[Tensor], Tensor]:
        """Tokens of each clip: (list of B 1-D int64 tensors of length sum_t k_t, (B, T) block_lengths)."""
        lengths = self.check_assignments(assignments, video.shape[0])
        z, valid = self._encode_packed(self.reference(video), lengths)
        indices = self.quantizer.quantize(z)
        return [indices[b][valid[b]] for b in range(len(indices))], lengths

    @torch.no_grad()
    def decode(self, tokens: list[Tensor] | Tensor, block_lengths: Tensor) -> Tensor:
        """Reconstruct (B, 3, F, H, W) from each clip's flat tokens and its (B, T) block lengths."""
        lengths = self.check_assignments(block_lengths, len(tokens))
        L = int(lengths.sum(1).max())
        ids = torch.zeros(len(tokens), L, dtype=torch.long, device=lengths.device)
        for b, tok in enumerate(tokens):
            if tok.numel() != int(lengths[b].sum()):
                raise ValueError(f"clip {b}: {tok.numel()} tokens but block_lengths sum to {int(lengths[b].sum())}")
            ids[b, : tok.numel()] = tok.to(ids.device)
        return self._decode_packed(self.quantizer.lookup(ids), lengths)[0]

    # ---------------------------------------------------------------- block-wise API
    @torch.no_grad()
    def encode_prefix_init(self, video: Tensor) -> EncoderState:
        """Reference features of B clips and an empty encoder prefix state (t = 0)."""
        ref = self.reference(video)  # (C, N, De)
        kv = [layer.cross_kv(ref) for layer in self.enc_layers]
        ref_k, ref_v = torch.stack([k for k, _ in kv], 1), torch.stack([v for _, v in kv], 1)  # (C, depth, H, N, dh)
        C, dev = ref.shape[0], ref.device
        empty = ref_k[:, :, :, :0]
        ids = torch.zeros(C, 0, dtype=torch.long, device=dev)
        return EncoderState(ref, ref_k, ref_v, torch.arange(C, device=dev), empty, empty, ids, ids.bool(), ids)

    def _block_k(self, k: Tensor | int, batch: int) -> Tensor:
        k = torch.full((batch,), int(k)) if isinstance(k, int) else torch.as_tensor(k)
        if k.shape != (batch,):
            raise ValueError(f"k must be an int or have shape ({batch},), got {tuple(k.shape)}")
        return self._check_levels(k.to(dtype=torch.long, device=self.level_offset.device))

    @torch.no_grad()
    def encode_block(self, state: EncoderState, k: Tensor | int) -> tuple[EncoderState, Tensor]:
        """Encode block ``state.t`` of every branch with k (int or (B,)) tokens.

        Returns:
            ``(new_state, tokens)`` with tokens (B, max k) int64, -1 past each branch's k.
        """
        c, t, n = self.config, state.t, self.config.patches_per_block
        if t >= c.blocks:
            raise ValueError(f"all {c.blocks} blocks are already encoded")
        k = self._block_k(k, len(state))
        B, kmax = k.shape[0], int(k.max())
        idx = torch.arange(kmax, device=k.device)
        q_valid = idx[None] < k[:, None]  # (B, kmax)
        rows = torch.where(q_valid, self.level_offset[k][:, None] + idx, 0)
        ref_t = state.ref.index_select(0, state.clip)[:, t * n : (t + 1) * n]  # (B, n, De)
        x = self._query_seeds(self.pool_rows[rows], ref_t, rows, t)
        q_bid = torch.full_like(rows, t)
        kv_bid, kv_valid = torch.cat([state.block_ids, q_bid], 1), torch.cat([state.valid, q_valid], 1)
        self_mask = block_causal_mask(q_bid, kv_bid, q_valid, kv_valid)
        cross_mask = block_causal_mask(q_bid, self.patch_blocks[: (t + 1) * n], q_valid)
        ks, vs = [], []
        for i, layer in enumerate(self.enc_layers):
            sk, sv = layer.self_kv(x)
            ks.append(torch.cat([state.self_k[:, i], sk], 2))
            vs.append(torch.cat([state.self_v[:, i], sv], 2))
            x = layer.attend_self(x, ks[-1], vs[-1], self_mask)
            ck = state.ref_k[:, i, :, : (t + 1) * n].index_select(0, state.clip)
            cv = state.ref_v[:, i, :, : (t + 1) * n].index_select(0, state.clip)
            x = layer.ffn(layer.attend_cross(x, ck, cv, cross_mask))
        tokens = self.quantizer.quantize(self.quant_in(self.enc_norm(x))).masked_fill(~q_valid, -1)
        new = dataclasses.replace(state, self_k=torch.stack(ks, 1), self_v=torch.stack(vs, 1), block_ids=kv_bid,
                                  valid=kv_valid, block_lengths=torch.cat([state.block_lengths, k[:, None]], 1))
        return new, tokens

    @torch.no_grad()
    def decode_prefix_init(self, batch: int) -> DecoderState:
        """Empty decoder prefix state (t = 0) for ``batch`` branches."""
        c, p = self.config, self.to_pixels.weight
        empty = p.new_zeros(batch, c.dec_depth, c.dec_heads, 0, c.dec_width // c.dec_heads)
        ids = torch.zeros(batch, 0, dtype=torch.long, device=p.device)
        return DecoderState(empty, empty, empty, empty, ids.bool(), ids, ids)

    @torch.no_grad()
    def decode_block(self, state: DecoderState, tokens: Tensor, k: Tensor | int) -> tuple[DecoderState, Tensor]:
        """Decode block ``state.t`` from its tokens ((B, >= max k) int64; entries past k ignored).

        Returns:
            ``(new_state, pixels)`` with pixels (B, 3, temporal_patch, H, W).
        """
        c, t, n, (h, w) = self.config, state.t, self.config.patches_per_block, self.config.grid
        if t >= c.blocks:
            raise ValueError(f"all {c.blocks} blocks are already decoded")
        k = self._block_k(k, len(state))
        B, kmax = k.shape[0], int(k.max())
        idx = torch.arange(kmax, device=k.device)
        t_valid = idx[None] < k[:, None]
        rows = torch.where(t_valid, self.level_offset[k][:, None] + idx, 0)
        ids = tokens[:, :kmax].masked_fill(~t_valid, 0)
        tok = self._token_context(self.quantizer.lookup(ids), rows, t)  # (B, kmax, Dd)
        x = self.dec_init(tok[:, :1]) + self.dec_pos.block(t)  # (B, n, Dd)
        tok_valid = torch.cat([state.tok_valid, t_valid], 1)
        tok_bid = torch.cat([state.tok_block_ids, torch.full_like(rows, t)], 1)
        cover = torch.cat([state.tok_valid.new_zeros(B, state.tok_valid.shape[1], n), self.pool_rows[rows] > 0], 1)
        cross_mask = padding_mask(torch.ones(B, n, dtype=torch.bool, device=k.device), tok_valid)
        local = locality_mask(self.patch_blocks[t * n : (t + 1) * n], self.patch_pos[:n], tok_bid, cover)
        sks, svs, tks, tvs = [], [], [], []
        for i, layer in enumerate(self.dec_layers):
            sk, sv = layer.self_kv(x)
            sks.append(torch.cat([state.self_k[:, i], sk], 2))
            svs.append(torch.cat([state.self_v[:, i], sv], 2))
            x = layer.attend_self(x, sks[-1], svs[-1], None)  # blocks <= t, no padding
            tk, tv = layer.cross_kv(tok)
            tks.append(torch.cat([state.tok_k[:, i], tk], 2))
            tvs.append(torch.cat([state.tok_v[:, i], tv], 2))
            x = layer.ffn(layer.attend_cross(x, tks[-1], tvs[-1], self._cross_mask(cross_mask, local, i, x.dtype)))
        pixels = depatchify(self.to_pixels(self.dec_norm(x)), 1, h, w, c.temporal_patch, c.spatial_patch)
        new = DecoderState(torch.stack(sks, 1), torch.stack(svs, 1), torch.stack(tks, 1), torch.stack(tvs, 1),
                           tok_valid, tok_bid, torch.cat([state.block_lengths, k[:, None]], 1))
        return new, pixels

    # ------------------------------------------------------------------------ save / load
    def save_pretrained(self, path: str | Path, *, preset: str | None = None,
                        ema: nn.Module | dict[str, Tensor] | None = None) -> Path:
        """Write a model directory (config.json + model.safetensors [+ ema.safetensors])."""
        return save_model(path, self, self.config, kind="tokenizer", preset=preset or getattr(self, "preset", None),
                          ema=ema)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, ema: bool = True,
                        map_location: str | torch.device = "cpu") -> EVATokTokenizer:
        """Load a model directory written by :meth:`save_pretrained` (EMA weights when present)."""
        model = load_model(path, kind="tokenizer", ema=ema, map_location=map_location)
        if not isinstance(model, cls):
            raise TypeError(f"{path}: loaded a {type(model).__name__}, expected {cls.__name__}")
        return model


# ----------------------------------------------------------------------------------- presets
TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # 8x32x32 clips, pt=2: 4 blocks of 4x4 patches, 5^4 = 625 assignments; a CPU step in ~10s of ms.
    "tiny": TokenizerConfig(
        frames=8, height=32, width=32, temporal_patch=2, spatial_patch=8, levels=(1, 2, 4, 8, 16),
        enc_width=64, enc_heads=4, patch_depth=1, enc_depth=2, dec_width=96, dec_heads=4, dec_depth=2,
        codebook_size=1024, code_dim=8, pos_embed="learned", dec_feature_layer=1,
    ),
    # 16x64x64 clips, pt=4: 4 blocks of 8x8 patches; a few M parameters.
    "small": TokenizerConfig(
        frames=16, height=64, width=64, temporal_patch=4, spatial_patch=8, levels=(8, 16, 32, 64, 128),
        enc_width=160, enc_heads=4, patch_depth=2, enc_depth=4, dec_width=192, dec_heads=6, dec_depth=6,
        codebook_size=8192, code_dim=8, dec_feature_layer=3,
    ),
    # The paper's S-B tokenizer: 16x128x128, 4x16x16 patches, 145M parameters.
    "paper": TokenizerConfig(),
}


def tokenizer_config(name: str, **overrides: Any) -> TokenizerConfig:
    """A preset by name, optionally with fields replaced."""
    if name not in TOKENIZER_PRESETS:
        raise KeyError(f"unknown tokenizer preset {name!r} (known: {', '.join(TOKENIZER_PRESETS)})")
    return dataclasses.replace(TOKENIZER_PRESETS[name], **overrides)
