"""Llama-style autoregressive GPT over variable-length EVATok token sequences (EVATok §4.1, PAPER §6).

Architecture (LlamaGen's "Llama-like GPT"): token embedding, pre-norm blocks of RMSNorm ->
causal self-attention with rotary position embeddings (RoPE, optional grouped-query heads) ->
RMSNorm -> SwiGLU MLP, a final RMSNorm and a linear head. No biases anywhere.

Vocabulary and sequence (DESIGN §3, contract). With C = ``codebook_size``, m levels and N classes:

    ids [0, C)                  codebook (visual) tokens
    ids [C, C + m)              one length token per level: ``level_token(i) = C + i``
    ids [C + m, C + m + N)      class tokens: ``class_token(c) = C + m + c``
    id  C + m + N               the null class (classifier-free guidance, unconditional rows)

    [class] [len(k_1)] tok x k_1 [len(k_2)] tok x k_2 ... [len(k_T)] tok x k_T

The head predicts the whole vocabulary (so logit index == token id and the head can be tied to the
embedding); the sampler (``evatok_cli/generate.py``) masks what may not come next. The class token
sits at position 0 and is never a prediction target.

Class dropout for CFG training is a *training* setting (the GPT train config owns its rate); this
module only provides :func:`drop_class`, the pure function that applies it to a batch. Dropout
inside the network (LlamaGen's: ``token_dropout`` on the input embeddings, ``resid_dropout`` on the
attention output before the residual add, ``ffn_dropout`` on the SwiGLU output before the residual
add) is architecture config, 0 by default (the paper is silent); it acts in training mode only.

Sections, in order: config, sequence helpers, blocks, model, presets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from evatok_cli.models.kv_cache import KVCache
from evatok_cli.models.modeldir import load_as, register_model_kind, save_model

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------- config
@dataclass(kw_only=True)
class GPTConfig:
    """Architecture and vocabulary of a :class:`GPT`.

    The data-dependent fields (``codebook_size``, ``levels``, ``blocks``, ``num_classes``) come from
    the token store; the rest from a preset (:data:`GPT_PRESETS`).

    Args:
        codebook_size: C, visual token ids are ``[0, C)``.
        levels: the tokens-per-block levels, strictly increasing (paper: 32..512).
        blocks: temporal blocks T per clip.
        num_classes: N real classes (0 for unconditional data); one null class is always added.
        dim, depth, heads: width, number of blocks, query heads.
        n_kv_heads: key/value heads (grouped-query attention); ``None`` = ``heads``.
        mlp_ratio, multiple_of: SwiGLU hidden = ``2/3 * mlp_ratio * dim`` rounded up to
            ``multiple_of`` (LlamaGen's rule).
        max_seq_len: longest sequence; ``None`` = ``1 + blocks * (1 + max(levels))``.
        rope_theta: RoPE base.
        tie_embeddings: share the token embedding with the output head.
        norm_eps: RMSNorm epsilon.
        init_std: std of the normal init of every linear and embedding weight.
        token_dropout: dropout on the token embeddings (LlamaGen ``token_dropout_p``).
        resid_dropout: dropout on each attention output before the residual add (``resid_dropout_p``).
        ffn_dropout: dropout on each SwiGLU output before the residual add (``ffn_dropout_p``).
            All three are 0 by default (the paper states none; LlamaGen trains with 0.1) and act in
            training mode only; at 0 no dropout module exists, so outputs and RNG use are unchanged.
    """

    codebook_size: int
    levels: tuple[int, ...]
    blocks: int
    num_classes: int
    dim: int
    depth: int
    heads: int
    n_kv_heads: int | None = None
    mlp_ratio: float = 4.0
    multiple_of: int = 256
    max_seq_len: int | None = None
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    token_dropout: float = 0.0
    resid_dropout: float = 0.0
    ffn_dropout: float = 0.0

    def __post_init__(self) -> None:
        self.levels = tuple(int(k) for k in self.levels)
        for name in ("token_dropout", "resid_dropout", "ffn_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {self.codebook_size}")
        if not self.levels or any(k < 1 for k in self.levels) or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels must be strictly increasing positive integers, got {self.levels}")
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if min(self.dim, self.depth, self.heads, self.multiple_of) < 1:
            raise ValueError("dim, depth, heads and multiple_of must be >= 1")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim {self.dim} / heads {self.heads} must give an even head_dim (RoPE)")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.heads % self.n_kv_heads):
            raise ValueError(f"heads {self.heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.max_seq_len is None:
            self.max_seq_len = self.min_seq_len
        if self.max_seq_len < self.min_seq_len:
            raise ValueError(f"max_seq_len {self.max_seq_len} < longest sequence {self.min_seq_len}")

    # vocabulary layout (DESIGN §3)
    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def level_token(self, i: int) -> int:
        """Id of the length token of level index ``i`` (0 = smallest level)."""
        if not 0 <= i < self.num_levels:
            raise ValueError(f"level index {i} out of range [0, {self.num_levels})")
        return self.codebook_size + i

    def class_token(self, c: int) -> int:
        """Id of class ``c``; ``c == num_classes`` (or -1, 'no label') is the null class."""
        if c == -1:
            c = self.num_classes
        if not 0 <= c <= self.num_classes:
            raise ValueError(f"class {c} out of range [0, {self.num_classes}] (num_classes is the null class)")
        return self.codebook_size + self.num_levels + c

    @property
    def null_class_token(self) -> int:
        return self.class_token(self.num_classes)

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + self.num_levels + self.num_classes + 1

    @property
    def min_seq_len(self) -> int:
        """Length of the longest valid sequence: 1 + blocks * (1 + max level)."""
        return 1 + self.blocks * (1 + self.levels[-1])

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * self.mlp_ratio * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# ------------------------------------------------------------------------------- sequence helpers
def build_sequence(
    tokens: torch.Tensor, block_lengths: Sequence[int] | torch.Tensor, label: int | None, cfg: GPTConfig
) -> torch.Tensor:
    """One clip's tokens -> its GPT sequence ``[class] [len(k_1)] tok.. ... [len(k_T)] tok..``.

    Args:
        tokens: 1-D codebook ids, ``sum(block_lengths)`` of them, in block order.
        block_lengths: (T,) tokens per block, each a level of ``cfg``.
        label: class id; ``None`` or -1 gives the null class.
        cfg: the GPT config (vocabulary layout).

    Returns:
        LongTensor (1 + T + sum(block_lengths),).
    """
    tokens = torch.as_tensor(tokens).long().flatten()
    lengths = [int(k) for k in torch.as_tensor(block_lengths).flatten().tolist()]
    if len(lengths) != cfg.blocks:
        raise ValueError(f"{len(lengths)} block lengths, expected {cfg.blocks}")
    if sum(lengths) != tokens.numel():
        raise ValueError(f"block lengths sum to {sum(lengths)} but there are {tokens.numel()} tokens")
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.codebook_size):
        raise ValueError(f"token ids must lie in [0, {cfg.codebook_size})")
    parts = [torch.tensor([cfg.class_token(-1 if label is None else int(label))])]
    start = 0
    for k in lengths:
        if k not in cfg.levels:
            raise ValueError(f"block length {k} is not a level {cfg.levels}")
        parts += [torch.tensor([cfg.level_token(cfg.levels.index(k))]), tokens[start : start + k]]
        start += k
    return torch.cat(parts)


def parse_sequence(seq: torch.Tensor, cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Inverse of :func:`build_sequence`, validating the structure.

    Returns:
        (tokens 1-D long, block_lengths (T,) long, label) with label ``num_classes`` for the null class.

    Raises:
        ValueError: naming the first position where ``seq`` is not a valid sequence.
    """
    ids = [int(t) for t in torch.as_tensor(seq).flatten().tolist()]
    C, m = cfg.codebook_size, cfg.num_levels
    if not ids or not C + m <= ids[0] < cfg.vocab_size:
        raise ValueError("position 0 must be a class token")
    label = ids[0] - C - m
    tokens: list[int] = []
    lengths: list[int] = []
    pos = 1
    for t in range(cfg.blocks):
        if pos >= len(ids) or not C <= ids[pos] < C + m:
            raise ValueError(f"position {pos}: expected the length token of block {t}")
        k = cfg.levels[ids[pos] - C]
        body = ids[pos + 1 : pos + 1 + k]
        if len(body) < k or any(not 0 <= x < C for x in body):
            raise ValueError(f"block {t} (from position {pos + 1}) must hold {k} codebook ids")
        tokens += body
        lengths.append(k)
        pos += 1 + k
    if pos != len(ids):
        raise ValueError(f"{len(ids) - pos} trailing ids after the last block")
    return torch.tensor(tokens, dtype=torch.long), torch.tensor(lengths, dtype=torch.long), label


def pad_batch(seqs: Sequence[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad sequences into a batch for :meth:`GPT.forward`.

    Targets are aligned with the inputs (``targets[b, i]`` is the id *at* position i) and the model
    shifts them; padding and the class position hold ``IGNORE_INDEX`` (-100).

    Returns:
        (input_ids (B, L) long, targets (B, L) long, lengths (B,) long).
    """
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    L = int(lengths.max())
    input_ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), L), IGNORE_INDEX, dtype=torch.long)
    for b, s in enumerate(seqs):
        input_ids[b, : len(s)] = s
        targets[b, 1 : len(s)] = s[1:]  # position 0 (the class) is never predicted
    return input_ids, targets, lengths


def drop_class(
    input_ids: torch.Tensor, p: float, cfg: GPTConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Class dropout for CFG training: replace the class at position 0 by the null class with prob ``p``."""
    if p <= 0:
        return input_ids
    u = torch.rand(input_ids.shape[0], generator=generator, device=generator.device if generator else "cpu")
    out = input_ids.clone()
    out[u.to(out.device) < p, 0] = cfg.null_class_token
    return out


# ------------------------------------------------------------------------------------------ blocks
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim/2) in float32 for integer ``positions`` (L,).

    Computed per call from the positions rather than kept as buffers, so that the tables never get
    cast to a low-precision model dtype and full and cached forwards use identical numbers.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (L, head_dim/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, head_dim) by the tables (half-split pairing: channel i with i + head_dim/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


def _dropout(p: float) -> nn.Module:
    """``nn.Dropout(p)``, or an identity at p = 0 (no RNG draws: bit-identical to a model without it)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)
        self.resid_drop = _dropout(cfg.resid_dropout)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, L, _ = x.shape
        q = self.wq(x).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)
        k = self.wk(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, L, hd)
        v = self.wv(x).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **sdpa) -> torch.Tensor:
        if self.kv_heads != self.heads:  # grouped-query: each kv head serves heads/kv_heads queries
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, **sdpa)  # (B, H, L, hd)
        B, _, L, _ = out.shape
        return self.resid_drop(self.wo(out.transpose(1, 2).reshape(B, L, self.heads * self.head_dim)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Full causal attention over x (B, L, D), positions 0..L-1."""
        q, k, v = self._qkv(x, cos, sin)
        return self._attend(q, k, v, is_causal=True)

    def cached(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: KVCache,
        layer: int,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention of the new positions [cache.pos, cache.pos + L) over everything cached so far."""
        q, k, v = self._qkv(x, cos, sin)
        k, v = cache.update(layer, k, v)
        return self._attend(q, k, v, attn_mask=mask)


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)
        self.ffn_drop = _dropout(cfg.ffn_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))

    def cached(self, x, cos, sin, cache: KVCache, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn.cached(self.attn_norm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.mlp_norm(x))


# ------------------------------------------------------------------------------------------- model
@register_model_kind("gpt", GPTConfig)
class GPT(nn.Module):
    """Class-conditional AR model over EVATok sequences; sampling lives in ``evatok_cli.sampling``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.dim)
        self.tok_drop = _dropout(config.token_dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(self._init)
        if config.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=self.config.init_std)

    def num_params(self) -> int:
        """Distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced pass over right-padded sequences.

        Args:
            idx: (B, L) ids, positions 0..L-1 (causal attention keeps padding out of valid positions).
            targets: (B, L) aligned with ``idx`` as from :func:`pad_batch` (-100 = ignore); the
                logits at position i are scored against ``targets[:, i + 1]``.

        Returns:
            (logits (B, L, vocab_size), mean cross-entropy over non-ignored targets or ``None``).
        """
        B, L = idx.shape
        if L > self.config.max_seq_len:
            raise ValueError(f"sequence length {L} > max_seq_len {self.config.max_seq_len}")
        cos, sin = rope_tables(torch.arange(L, device=idx.device), self.config.head_dim, self.config.rope_theta)
        x = self.tok_drop(self.tok_emb(idx))  # (B, L, D)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))  # (B, L, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty :class:`KVCache` on the model's device and dtype."""
        w = self.tok_emb.weight
        cfg = self.config
        return KVCache(
            cfg.depth,
            batch_size,
            cfg.kv_heads,
            max_len or cfg.max_seq_len,
            cfg.head_dim,
            dtype=w.dtype,
            device=w.device,
        )

    def _cached_logits(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run new positions through the model, appending to ``cache``; logits of the last one (B, V)."""
        L = idx.shape[1]
        start = cache.pos
        positions = torch.arange(start, start + L, device=idx.device)
        cos, sin = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        # new position start+i may see cached positions <= start+i; one new position sees all of them
        mask = None if L == 1 else torch.arange(start + L, device=idx.device)[None, :] <= positions[:, None]
        x = self.tok_drop(self.tok_emb(idx))  # (B, L, D)
        for layer, block in enumerate(self.blocks):
            x = block.cached(x, cos, sin, cache, layer, mask)
        cache.advance(L)
        return self.head(self.norm(x[:, -1]))  # (B, V)

    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Encode a prompt (B, L) into ``cache`` (usually empty); returns the last position's logits (B, V)."""
        return self._cached_logits(idx, cache)

    def decode_step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row, (B, 1), at position ``cache.pos``; returns its logits (B, V)."""
        if idx.shape[1] != 1:
            raise ValueError(f"decode_step takes one token per row, got shape {tuple(idx.shape)}")
        return self._cached_logits(idx, cache)

    def save_pretrained(self, path: str | Path, *, preset: str | None = None, ema: nn.Module | None = None) -> Path:
        """Write a model directory (DESIGN §5) of kind ``gpt``."""
        return save_model(path, self, self.config, kind="gpt", preset=preset, ema=ema)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, ema: bool = True, map_location: str | torch.device = "cpu") -> GPT:
        """Load a ``gpt`` model directory (EMA weights when present and ``ema``)."""
        return load_as(cls, path, ema=ema, map_location=map_location)


# ----------------------------------------------------------------------------------------- presets
def _preset(**arch) -> Callable[..., GPTConfig]:
    def make(*, codebook_size: int, levels: Sequence[int], blocks: int, num_classes: int, **overrides) -> GPTConfig:
        fields = {**arch, **overrides}
        return GPTConfig(
            codebook_size=codebook_size, levels=tuple(levels), blocks=blocks, num_classes=num_classes, **fields
        )

    return make


# Parameter counts for codebook 8192, levels {32..512}, 4 blocks, 101 classes (vocab 8299), untied
# head (as in LlamaGen, whose GPT-B/GPT-L these are; the paper's 99M/327M = LlamaGen's 111M/343M
# with an 8192 vocabulary): gpt-b 97.7M, gpt-l 325.3M. gpt-l-plus (paper: 633M, no config given)
# is LlamaGen-XL's width (1280, 20 heads) at depth 30: 630.5M. tiny: tied head, GQA, for tests.
GPT_PRESETS: dict[str, Callable[..., GPTConfig]] = {
    "tiny": _preset(dim=64, depth=2, heads=4, n_kv_heads=2, multiple_of=32, tie_embeddings=True),
    "gpt-b": _preset(dim=768, depth=12, heads=12),
    "gpt-l": _preset(dim=1024, depth=24, heads=16),
    "gpt-l-plus": _preset(dim=1280, depth=30, heads=20),
}


def gpt_config(
    preset: str, *, codebook_size: int, levels: Sequence[int], blocks: int, num_classes: int, **overrides
) -> GPTConfig:
    """``GPT_PRESETS[preset]`` with the data-dependent fields (from the token store) filled in."""
    if preset not in GPT_PRESETS:
        raise ValueError(f"unknown GPT preset {preset!r} (known: {', '.join(GPT_PRESETS)})")
    return GPT_PRESETS[preset](
        codebook_size=codebook_size, levels=levels, blocks=blocks, num_classes=num_classes, **overrides
    )
