"""EVATok adaptive-length block-causal 1D video tokenizer (EVATok §3.1, supplementary K).

video (B, 3, F, H, W) in [-1, 1]
  -> linear patch embedding + 3D positions [-> ``patch_depth`` block-causal layers; 0 in the paper]
     ("reference")
  -> Q-Former encoder: block t gets k_t queries seeded by pooling block t's reference grid
     (+ learned (level, index) and block embeddings); self-attn among queries, cross-attn to the
     reference, MLP, all block-causal
  -> l2-normalised VQ (codebook_size x code_dim)
  -> Q-Former decoder: one 3D query per patch, initialised from the first token of its block
     + 3D positions; self-attn among 3D queries, cross-attn to tokens (both block-causal,
     [+ a learned locality bias, ``dec_locality_bias``; off in the paper]), MLP
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
from evatok_cli.models.attention import (
    additive_mask,
    block_causal_mask,
    locality_mask,
    packed_layout,
    padding_fraction,
    patch_block_ids,
)
from evatok_cli.models.blockwise import DecoderState, EncoderState
from evatok_cli.models.modeldir import load_as, register_model_kind, save_model
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
    """Architecture of an :class:`EVATokTokenizer` (defaults: the paper's S-B, ~142M params; PAPER: 145M).

    The defaults are the paper's architecture (EVATok §3.1): a linear patch embedding feeds the
    Q-Former directly (``patch_depth=0``) and the decoder's cross-attention has no locality bias
    (``dec_locality_bias=0``). Both extras are ours, kept as options and on in ``tiny``/``small``.
    """

    frames: int = 16
    height: int = 128
    width: int = 128
    temporal_patch: int = 4
    spatial_patch: int = 8
    levels: tuple[int, ...] = (32, 64, 128, 256, 512)
    enc_width: int = 512  # reference layers and Q-Former encoder
    enc_heads: int = 8
    patch_depth: int = 0  # extra: block-causal transformer layers over patches; 0 = linear embedding (paper)
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
    dec_locality_bias: float = 0.0  # extra: initial learned cross-attn bias towards covering tokens; 0 = off (paper)
    nearest_chunk: int = 4096  # tile size of the nearest-code search

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(k) for k in self.levels))
        pt, ps = self.temporal_patch, self.spatial_patch
        for name in (
            "frames",
            "height",
            "width",
            "temporal_patch",
            "spatial_patch",
            "enc_width",
            "enc_heads",
            "enc_depth",
            "dec_width",
            "dec_heads",
            "dec_depth",
            "codebook_size",
            "code_dim",
            "nearest_chunk",
        ):
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
        self.quantizer = VectorQuantizer(
            c.codebook_size,
            c.code_dim,
            beta=c.commit_beta,
            entropy_temperature=c.entropy_temperature,
            chunk_size=c.nearest_chunk,
        )
        self.token_proj = nn.Linear(c.code_dim, Dd)
        self.token_embed = nn.Parameter(torch.randn(n_rows, Dd) * 0.02)
        self.token_block_embed = nn.Parameter(torch.randn(T, Dd) * 0.02)
        self.dec_init = nn.Linear(Dd, Dd)
        self.dec_pos = PosEmbed3D(T, h, w, Dd, c.pos_embed)
        self.dec_layers = nn.ModuleList(QFormerLayer(Dd, c.dec_heads, Dd, c.mlp_ratio) for _ in range(c.dec_depth))
        # One learned scalar per decoder layer: extra attention logit from a 3D query to the tokens of
        # its own block whose pooling cell covers its position (docs/tokenizer.md, "locality bias").
        self.dec_local_bias = (
            nn.Parameter(torch.full((c.dec_depth,), float(c.dec_locality_bias))) if c.dec_locality_bias > 0 else None
        )
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

    def _cross_mask(self, allowed: Tensor | None, local: Tensor, layer: int, dtype: torch.dtype) -> Tensor | None:
        """Decoder cross-attention mask of one layer: bool (None: no mask), or float with the locality bias."""
        if self.dec_local_bias is None:
            return allowed
        assert allowed is not None, "the locality bias needs the bool mask"
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
        kv = [layer.cross_kv(ref) for layer in self.enc_layers]  # per layer (C, H, N, dh) each
        C, dev = ref.shape[0], ref.device
        empty = tuple(k[:, :, :0] for k, _ in kv)
        ids = torch.zeros(C, 0, dtype=torch.long, device=dev)
        return EncoderState(
            ref,
            tuple(k for k, _ in kv),
            tuple(v for _, v in kv),
            torch.arange(C, device=dev),
            empty,
            empty,
            ids.bool(),
            ids,
        )

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
        k = self._block_k(k, len(state))
        idx = torch.arange(int(k.max()), device=k.device)
        q_valid = idx[None] < k[:, None]  # (B, kmax)
        rows = torch.where(q_valid, self.level_offset[k][:, None] + idx, 0)
        # Every cached key and every patch up to block t is in a block <= t, so the block-causal masks
        # of the full forward reduce to the keys' padding flags (each row sees at least its own first
        # query). Padding queries go unmasked: their outputs are never read (masked as keys, token -1).
        kv_valid = torch.cat([state.valid, q_valid], 1)  # (B, L + kmax)
        z, caches = self._encode_step(state, rows, None if bool(kv_valid.all()) else kv_valid[:, None, None, :], True)
        tokens = self.quantizer.quantize(z).masked_fill(~q_valid, -1)
        ks, vs = zip(*caches)
        new = dataclasses.replace(
            state, self_k=ks, self_v=vs, valid=kv_valid, block_lengths=torch.cat([state.block_lengths, k[:, None]], 1)
        )
        return new, tokens

    def _level_rows(self, levels: Tensor) -> tuple[Tensor, Tensor]:
        """(Q,) (level, index) rows of ``levels``' queries side by side, and (Q,) the level slot of each."""
        slot = torch.arange(len(levels), device=levels.device).repeat_interleave(levels)
        starts = levels.cumsum(0) - levels
        return self.level_offset[levels][slot] + torch.arange(len(slot), device=levels.device) - starts[slot], slot

    @torch.no_grad()
    def encode_block_levels(self, state: EncoderState, levels: Tensor | Any) -> Tensor:
        """Encode block ``state.t`` of every branch once per level, in one pass and without new states.

        The m children of a branch share its cached prefix instead of each copying it: their queries
        sit side by side (Q = sum of the levels) and a child's queries see the prefix and each other.
        What the exact search runs at the last block (its leaves), where no child state is needed.

        Returns:
            (B, Q) int64 tokens: the k_1 tokens of level 1, then the k_2 of level 2, ...
        """
        levels = self._block_k(levels, len(levels))
        rows, slot = self._level_rows(levels)
        B, Q = len(state), len(rows)
        own = (slot[:, None] == slot[None, :]).expand(B, Q, Q)  # (B, Q, Q) a child's own queries
        mask = torch.cat([state.valid[:, None, :].expand(B, Q, -1), own], 2)[:, None]  # (B, 1, Q, L + Q)
        return self.quantizer.quantize(self._encode_step(state, rows, mask, False)[0])

    def _encode_step(
        self, state: EncoderState, rows: Tensor, self_mask: Tensor | None, keep: bool
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Queries ``rows`` ((B, Lq) or (Lq,)) of block ``state.t`` -> ((B, Lq, code_dim), then per layer
        the new cache (keys, values) when ``keep``, else [])."""
        c, t, n, B = self.config, state.t, self.config.patches_per_block, len(state)
        if t >= c.blocks:
            raise ValueError(f"all {c.blocks} blocks are already encoded")
        ref_t = state.ref[:, t * n : (t + 1) * n].index_select(0, state.clip)  # (B, n, De): slice, then gather
        pool = self.pool_rows[rows]
        x = self._query_seeds(pool if pool.dim() == 3 else pool.expand(B, -1, -1), ref_t, rows, t)  # (B, Lq, De)
        x = x.expand(B, -1, -1) if x.dim() == 2 else x
        caches = []
        for i, layer in enumerate(self.enc_layers):
            sk, sv = layer.self_kv(x)
            sk, sv = torch.cat([state.self_k[i], sk], 2), torch.cat([state.self_v[i], sv], 2)  # (B, H, L + Lq, dh)
            x = layer.attend_self(x, sk, sv, self_mask)
            if keep:
                caches.append((sk, sv))
            ck = state.ref_k[i][:, :, : (t + 1) * n].index_select(0, state.clip)  # (B, H, (t+1)*n, dh)
            cv = state.ref_v[i][:, :, : (t + 1) * n].index_select(0, state.clip)
            x = layer.ffn(layer.attend_cross(x, ck, cv, None))  # every query sees every patch <= t
        return self.quant_in(self.enc_norm(x)), caches

    @torch.no_grad()
    def decode_prefix_init(self, batch: int) -> DecoderState:
        """Empty decoder prefix state (t = 0) for ``batch`` branches."""
        c, p = self.config, self.to_pixels.weight
        empty = tuple(p.new_zeros(batch, c.dec_heads, 0, c.dec_width // c.dec_heads) for _ in range(c.dec_depth))
        ids = torch.zeros(batch, 0, dtype=torch.long, device=p.device)
        return DecoderState(empty, empty, empty, empty, ids.bool(), ids)

    @torch.no_grad()
    def decode_block(self, state: DecoderState, tokens: Tensor, k: Tensor | int) -> tuple[DecoderState, Tensor]:
        """Decode block ``state.t`` from its tokens ((B, >= max k) int64; entries past k ignored).

        Returns:
            ``(new_state, pixels)`` with pixels (B, 3, temporal_patch, H, W).
        """
        k = self._block_k(k, len(state))
        B, kmax, n = k.shape[0], int(k.max()), self.config.patches_per_block
        idx = torch.arange(kmax, device=k.device)
        t_valid = idx[None] < k[:, None]
        rows = torch.where(t_valid, self.level_offset[k][:, None] + idx, 0)
        tok_valid = torch.cat([state.tok_valid, t_valid], 1)  # (B, L)
        # All keys are in blocks <= t: the block-causal masks reduce to the tokens' padding flags.
        allowed = tok_valid[:, None, None, :]  # (B, 1, 1, L)
        cover = (self.pool_rows[rows] > 0).transpose(1, 2)  # (B, n, kmax): a new token covers the query's patch
        local = torch.cat([cover.new_zeros(B, n, state.tok_valid.shape[1]), cover], 2)[:, None]  # (B, 1, n, L)
        if self.dec_local_bias is None and bool(tok_valid.all()):
            allowed = None
        x, caches = self._decode_step(
            state,
            tokens[:, :kmax].masked_fill(~t_valid, 0),
            rows,
            torch.zeros(B, 1, dtype=torch.long, device=k.device),
            None,
            allowed,
            local,
            True,
        )
        sks, svs, tks, tvs = zip(*caches)
        new = DecoderState(sks, svs, tks, tvs, tok_valid, torch.cat([state.block_lengths, k[:, None]], 1))
        return new, x[:, 0]

    @torch.no_grad()
    def decode_block_levels(self, state: DecoderState, tokens: Tensor, levels: Tensor | Any) -> Tensor:
        """Decode block ``state.t`` of every branch once per level from :meth:`encode_block_levels`' tokens.

        Each child's 3D queries see the prefix, each other and the child's own tokens (one pass,
        the prefix shared, no new states).

        Returns:
            (B, m, 3, temporal_patch, H, W) pixels, one block per level.
        """
        levels = self._block_k(levels, len(levels))
        rows, slot = self._level_rows(levels)
        B, m, n, L0 = len(state), len(levels), self.config.patches_per_block, state.tok_valid.shape[1]
        q_slot = torch.arange(m, device=slot.device).repeat_interleave(n)  # (m*n,) the child of each 3D query
        own = q_slot[:, None] == q_slot[None, :]  # (mn, mn)
        self_mask = torch.cat([own.new_ones(m * n, state.t * n), own], 1)[None, None]  # (1, 1, mn, t*n + mn)
        mine = (q_slot[:, None] == slot[None, :]).expand(B, -1, -1)  # (B, mn, Q) the child's own tokens
        allowed = torch.cat([state.tok_valid[:, None, :].expand(B, m * n, L0), mine], 2)[:, None]  # (B, 1, mn, L0 + Q)
        cover = (self.pool_rows[rows] > 0).T.repeat(m, 1) & mine  # (B, mn, Q)
        local = torch.cat([cover.new_zeros(B, m * n, L0), cover], 2)[:, None]
        first = (levels.cumsum(0) - levels)[None].expand(B, -1)  # (B, m) each child's first token
        return self._decode_step(state, tokens, rows, first, self_mask, allowed, local, False)[0]

    def _decode_step(
        self,
        state: DecoderState,
        ids: Tensor,
        rows: Tensor,
        first: Tensor,
        self_mask: Tensor | None,
        allowed: Tensor | None,
        local: Tensor,
        keep: bool,
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor, Tensor, Tensor]]]:
        """Block ``state.t`` of c children per branch, each seeded by its token ``first`` ((B, c)).

        Args:
            ids: (B, Lt) token ids; rows: their (level, index) rows ((B, Lt) or (Lt,)).
            self_mask, allowed: bool masks of the self- and cross-attention (None: attend everything;
                ``allowed`` is needed with the locality bias).
            local: (B, 1, c*n, L) bool, where the locality bias applies.
            keep: return the new caches (else []: nothing is held past its layer).

        Returns:
            ((B, c, 3, pt, H, W) pixels, per layer the new (self keys, self values, token keys, token values)).
        """
        cf, t, n, (h, w) = self.config, state.t, self.config.patches_per_block, self.config.grid
        if t >= cf.blocks:
            raise ValueError(f"all {cf.blocks} blocks are already decoded")
        B, c = first.shape
        tok = self._token_context(self.quantizer.lookup(ids), rows, t)  # (B, Lt, Dd)
        seed = self.dec_init(tok.gather(1, first[..., None].expand(-1, -1, tok.shape[-1])))  # (B, c, Dd)
        x = (seed[:, :, None, :] + self.dec_pos.block(t)).reshape(B, c * n, -1)  # (B, c*n, Dd)
        caches = []
        for i, layer in enumerate(self.dec_layers):
            sk, sv = layer.self_kv(x)
            sk, sv = torch.cat([state.self_k[i], sk], 2), torch.cat([state.self_v[i], sv], 2)
            x = layer.attend_self(x, sk, sv, self_mask)
            tk, tv = layer.cross_kv(tok)
            tk, tv = torch.cat([state.tok_k[i], tk], 2), torch.cat([state.tok_v[i], tv], 2)
            x = layer.ffn(layer.attend_cross(x, tk, tv, self._cross_mask(allowed, local, i, x.dtype)))
            if keep:
                caches.append((sk, sv, tk, tv))
        pixels = self.to_pixels(self.dec_norm(x)).reshape(B * c, n, -1)  # (B*c, n, patch_dim)
        pixels = depatchify(pixels, 1, h, w, cf.temporal_patch, cf.spatial_patch)
        return pixels.reshape(B, c, *pixels.shape[1:]), caches

    # ------------------------------------------------------------------------ save / load
    def save_pretrained(
        self, path: str | Path, *, preset: str | None = None, ema: nn.Module | dict[str, Tensor] | None = None
    ) -> Path:
        """Write a model directory (config.json + model.safetensors [+ ema.safetensors])."""
        return save_model(
            path, self, self.config, kind="tokenizer", preset=preset or getattr(self, "preset", None), ema=ema
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, ema: bool = True, map_location: str | torch.device = "cpu"
    ) -> EVATokTokenizer:
        """Load a model directory written by :meth:`save_pretrained` (EMA weights when present)."""
        return load_as(cls, path, ema=ema, map_location=map_location)


# ----------------------------------------------------------------------------------- presets
TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    # 8x32x32 clips, pt=2: 4 blocks of 4x4 patches, 5^4 = 625 assignments; a CPU step in ~10s of ms.
    "tiny": TokenizerConfig(
        frames=8,
        height=32,
        width=32,
        temporal_patch=2,
        spatial_patch=8,
        levels=(1, 2, 4, 8, 16),
        enc_width=64,
        enc_heads=4,
        patch_depth=0,  # docs/tokenizer.md "Ablation": no gain over the locality bias alone (3 seeds)
        enc_depth=2,
        dec_width=96,
        dec_heads=4,
        dec_depth=2,
        codebook_size=1024,
        code_dim=8,
        pos_embed="learned",
        dec_feature_layer=1,
        dec_locality_bias=4.0,
    ),
    # 16x64x64 clips, pt=4: 4 blocks of 8x8 patches; a few M parameters.
    "small": TokenizerConfig(
        frames=16,
        height=64,
        width=64,
        temporal_patch=4,
        spatial_patch=8,
        levels=(8, 16, 32, 64, 128),
        enc_width=160,
        enc_heads=4,
        patch_depth=2,
        enc_depth=4,
        dec_width=192,
        dec_heads=6,
        dec_depth=6,
        codebook_size=8192,
        code_dim=8,
        dec_feature_layer=3,
        dec_locality_bias=4.0,
    ),
    # The paper's S-B tokenizer: 16x128x128, 4x16x16 patches, linear patch embedding, no locality
    # bias: 142.0M parameters (PAPER: 145M). The extras: tokenizer_config("paper", patch_depth=2,
    # dec_locality_bias=4.0) (148.3M).
    "paper": TokenizerConfig(),
}


def tokenizer_config(name: str, **overrides: Any) -> TokenizerConfig:
    """A preset by name, optionally with fields replaced."""
    if name not in TOKENIZER_PRESETS:
        raise KeyError(f"unknown tokenizer preset {name!r} (known: {', '.join(TOKENIZER_PRESETS)})")
    return dataclasses.replace(TOKENIZER_PRESETS[name], **overrides)
