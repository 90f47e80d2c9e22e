"""Sampling EVATok sequences from a :class:`~evatok_cli.models.gpt.GPT` (EVATok §4.1, PAPER §6).

The model only scores the next id; this module decides what may come next (STYLE rule 9):

- **Structural masking.** Where a length token is due, only the m level ids are allowed; after
  level i is drawn, exactly ``levels[i]`` codebook ids follow (only codebook ids allowed); this
  repeats for the T blocks. Class ids are never allowed. Every sample is therefore a valid sequence.
- **Token budget** (``max_tokens``): a level is masked when taking it would leave too few tokens
  for the remaining blocks at the smallest level, so every sample's total is <= ``max_tokens``.
- **Forced assignment** (``force_assignment``): the length tokens are fixed instead of drawn
  (benchmarks).
- **Prefix** (``prefix``, frame prediction / video continuation): each row's first P blocks are
  given (their length tokens and codebook ids, e.g. the encoded first frames of a clip); they are
  teacher-forced in one prefill and only the remaining T - P blocks are sampled. The returned
  samples hold the prefix too (a whole clip, ready to decode).
- **Classifier-free guidance**: conditional and null-class rows run as one batch and
  ``logits = uncond + s * (cond - uncond)``, before masking and sampling; at ``s == 1`` the
  unconditional rows are not run at all.
- Temperature, top-k, top-p, greedy; draws come from ``generator`` only, so a seeded generator
  reproduces the samples.

The model is run with a KV cache (prefill of the class token and any prefix, then one ``decode_step`` per id).
:func:`generate_uncached` recomputes the whole prefix each step and exists to test the cache.

Shared by the jobs that sample (``evatok generate``, ``evatok eval gen``): :func:`check_tokenizer`
(a GPT is only decoded by the tokenizer its training tokens came from) and :func:`default_cfg_scale`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from evatok_cli.checkpoint import OpenModel, TokenizerMismatchError
from evatok_cli.models.gpt import GPT, GPTConfig

log = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, torch.Tensor]


# PAPER §6: constant CFG 2.5 for GPT-B, 1.75 for the larger models.
_CFG_BY_PRESET = {"tiny": 2.5, "gpt-b": 2.5}
LARGE_CFG = 1.75


def default_cfg_scale(preset: str | None, num_classes: int) -> float:
    """PAPER §6: 2.5 for GPT-B (and ``tiny``), 1.75 for larger GPTs; 1 (no guidance) without classes."""
    if num_classes == 0:
        return 1.0
    return _CFG_BY_PRESET.get(preset or "", LARGE_CFG)


def check_tokenizer(gpt: OpenModel, tokenizer: OpenModel) -> None:
    """Refuse a tokenizer other than the one the GPT's training data was written with (one-line errors).

    Raises:
        TokenizerMismatchError: another assignment space, codebook size or weights sha256.
    """
    cfg, meta, tok = gpt.model.config, gpt.meta, tokenizer.model
    gpt_dir, tok_dir = gpt.dir, tokenizer.dir
    want_space = meta.get("space") or {"levels": list(cfg.levels), "blocks": cfg.blocks}
    got_space = tok.space.to_dict()
    same_levels = [int(k) for k in want_space["levels"]] == [int(k) for k in got_space["levels"]]
    if not same_levels or int(want_space["blocks"]) != int(got_space["blocks"]):
        raise TokenizerMismatchError(
            f"{tok_dir}: its assignment space {got_space} differs from the one {gpt_dir} was trained on {want_space}"
        )
    if int(tok.config.codebook_size) != cfg.codebook_size:
        raise TokenizerMismatchError(
            f"{tok_dir}: codebook of {tok.config.codebook_size} codes, but {gpt_dir} was trained on {cfg.codebook_size}"
        )
    want = (meta.get("tokenizer") or {}).get("sha256")
    if want:
        got = tokenizer.sha256
        if got != want:
            raise TokenizerMismatchError(
                f"{tok_dir}: not the tokenizer {gpt_dir} was trained on (weights sha256 {got[:12]}, "
                f"expected {want[:12]})"
            )
    else:
        log.warning("%s records no tokenizer sha256; only the space and codebook size were checked", gpt_dir)


# ------------------------------------------------------------------------------ logit processing
def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row (ties at the threshold kept), -inf elsewhere."""
    k = min(int(k), logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of top ids whose probability reaches ``p`` (at least one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs > p  # mass strictly before this id already reaches p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample_from_logits(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row by inverse-CDF sampling; ids with zero probability are never drawn.

    Uniforms are drawn on the generator's device and moved, so any generator works with any model
    device and the draws depend on the seed only.
    """
    probs = logits.float().softmax(dim=-1)
    cdf = probs.cumsum(dim=-1)  # (B, V)
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape[0], 1, generator=generator, device=device).to(logits.device)
    u = u.clamp_min(1e-12) * cdf[:, -1:]  # u > 0: the first id with cdf >= u has positive probability
    return (cdf < u).sum(dim=-1).clamp_max(logits.shape[-1] - 1)


# --------------------------------------------------------------------------- structural masks
def allowed_ids(
    cfg: GPTConfig,
    remaining: torch.Tensor,
    block: torch.Tensor,
    used: torch.Tensor,
    done: torch.Tensor,
    *,
    max_tokens: int | None,
    forced: torch.Tensor | None,
) -> torch.Tensor:
    """(B, V) bool: which ids each row may emit next (PAPER §6 logit masking).

    Args:
        remaining: (B,) codebook ids still due in the current block (0: a length token is due).
        block: (B,) length tokens emitted so far.
        used: (B,) codebook ids emitted so far.
        done: (B,) rows that finished (they may only emit id 0, which is discarded).
        max_tokens: token budget or ``None``.
        forced: (B, T) level index per block, or ``None``.
    """
    B, C, m = remaining.shape[0], cfg.codebook_size, cfg.num_levels
    device = remaining.device
    allowed = torch.zeros(B, cfg.vocab_size, dtype=torch.bool, device=device)
    length_due = (remaining == 0) & ~done
    allowed[:, :C] = (~length_due & ~done)[:, None]
    level_ok = torch.ones(B, m, dtype=torch.bool, device=device)
    if max_tokens is not None:
        levels = torch.tensor(cfg.levels, device=device)
        blocks_after = (cfg.blocks - 1 - block).clamp_min(0)  # blocks still to come after this one
        need = used[:, None] + levels[None, :] + blocks_after[:, None] * cfg.levels[0]  # (B, m)
        level_ok &= need <= max_tokens
    if forced is not None:
        want = forced.gather(1, block.clamp_max(cfg.blocks - 1)[:, None])  # (B, 1)
        level_ok &= torch.arange(m, device=device)[None, :] == want
    allowed[:, C : C + m] = level_ok & length_due[:, None]
    allowed[done, 0] = True
    return allowed


# ------------------------------------------------------------------------------- model drivers
class _Driver(Protocol):
    def start(self, first: torch.Tensor) -> torch.Tensor: ...
    def step(self, ids: torch.Tensor) -> torch.Tensor: ...


class _Cached:
    def __init__(self, model: GPT, rows: int) -> None:
        self.model, self.cache = model, model.new_cache(rows)

    def start(self, first: torch.Tensor) -> torch.Tensor:
        return self.model.prefill(first, self.cache)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.decode_step(ids, self.cache)


class _Uncached:
    def __init__(self, model: GPT) -> None:
        self.model, self.seq = model, None

    def start(self, first: torch.Tensor) -> torch.Tensor:
        self.seq = first
        return self.model(self.seq)[0][:, -1]

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        self.seq = torch.cat([self.seq, ids], dim=1)
        return self.model(self.seq)[0][:, -1]


# ---------------------------------------------------------------------------------- sampling
def _forced_levels(cfg: GPTConfig, force: Sequence[int] | torch.Tensor, batch: int, device) -> torch.Tensor:
    f = torch.as_tensor(force, dtype=torch.long)
    if f.dim() == 1:
        f = f[None].expand(batch, -1)
    if f.shape != (batch, cfg.blocks):
        raise ValueError(f"force_assignment must be (T,) or (B, T) = ({batch}, {cfg.blocks}), got {tuple(f.shape)}")
    bad = [int(k) for k in f.unique() if int(k) not in cfg.levels]
    if bad:
        raise ValueError(f"force_assignment holds non-levels {bad}; levels are {cfg.levels}")
    pos = {k: i for i, k in enumerate(cfg.levels)}
    return torch.tensor([[pos[int(k)] for k in row] for row in f.tolist()], dtype=torch.long, device=device)


def _generate(
    model: GPT,
    labels: torch.Tensor,
    *,
    cached: bool,
    cfg_scale: float,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    max_tokens: int | None,
    force_assignment: Sequence[int] | torch.Tensor | None,
    greedy: bool,
    generator: torch.Generator | None,
    prefix: Sequence[Sample] | None = None,
) -> list[Sample]:
    cfg = model.config
    device = model.tok_emb.weight.device
    labels = torch.as_tensor(labels, dtype=torch.long).flatten().to(device)
    B = labels.shape[0]
    if B == 0:
        return []
    if int(labels.min()) < 0 or int(labels.max()) > cfg.num_classes:
        raise ValueError(f"labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = null class)")
    if max_tokens is not None and max_tokens < cfg.blocks * cfg.levels[0]:
        raise ValueError(f"max_tokens {max_tokens} < {cfg.blocks} blocks x smallest level {cfg.levels[0]}")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 1")
    forced = None if force_assignment is None else _forced_levels(cfg, force_assignment, B, device)
    if forced is not None and max_tokens is not None:
        totals = torch.tensor(cfg.levels, device=device)[forced].sum(1)
        if int(totals.max()) > max_tokens:
            raise ValueError(f"force_assignment totals {int(totals.max())} tokens > max_tokens {max_tokens}")
    greedy = greedy or temperature == 0
    guided = cfg_scale != 1.0
    pre_ids, pre_tokens, pre_lengths = _prefix_ids(cfg, prefix, B, device)
    if forced is not None and pre_lengths.numel():
        pos = {k: i for i, k in enumerate(cfg.levels)}
        want = torch.tensor([pos[int(k)] for k in pre_lengths.tolist()], device=device)
        if not bool((forced[:, : want.numel()] == want).all()):
            raise ValueError("force_assignment disagrees with the prefix's block lengths")
    P, n_pre = pre_lengths.numel(), int(pre_lengths.sum())
    if max_tokens is not None and n_pre + (cfg.blocks - P) * cfg.levels[0] > max_tokens:
        raise ValueError(
            f"the prefix's {n_pre} tokens leave no room for {cfg.blocks - P} blocks in max_tokens {max_tokens}"
        )

    rows = 2 * B if guided else B
    driver: _Driver = _Cached(model, rows) if cached else _Uncached(model)
    first = labels + cfg.codebook_size + cfg.num_levels  # class ids, (B,)
    if guided:
        first = torch.cat([first, torch.full_like(first, cfg.null_class_token)])
    start = first[:, None]  # (rows, 1)
    if pre_ids is not None:  # teacher-forced prefix, the same for the conditional and null-class halves
        start = torch.cat([start, torch.cat([pre_ids, pre_ids]) if guided else pre_ids], dim=1)
    logits = driver.start(start)  # (rows, V)

    levels = torch.tensor(cfg.levels, device=device)
    remaining = torch.zeros(B, dtype=torch.long, device=device)
    block = torch.full_like(remaining, P)
    used = torch.full_like(remaining, n_pre)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if P == cfg.blocks:
        done[:] = True
    emitted: list[torch.Tensor] = []  # (B,) ids per step
    is_length: list[torch.Tensor] = []
    while not bool(done.all()):
        logits = logits.float()
        if guided:
            logits = apply_cfg(logits[:B], logits[B:], cfg_scale)
        allowed = allowed_ids(cfg, remaining, block, used, done, max_tokens=max_tokens, forced=forced)
        logits = logits.masked_fill(~allowed, float("-inf"))
        if greedy:
            nxt = logits.argmax(dim=-1)
        else:
            logits = logits / temperature
            if top_k is not None:
                logits = top_k_filter(logits, top_k)
            if top_p is not None:
                logits = top_p_filter(logits, top_p)
            nxt = sample_from_logits(logits, generator)
        length_due = (remaining == 0) & ~done
        emitted.append(nxt)
        is_length.append(length_due)
        level = (nxt - cfg.codebook_size).clamp(0, cfg.num_levels - 1)
        remaining = torch.where(length_due, levels[level], remaining - (~done).long())
        used = used + (~length_due & ~done).long()
        block = block + length_due.long()
        done = (block == cfg.blocks) & (remaining == 0)
        if bool(done.all()):
            break
        logits = driver.step((torch.cat([nxt, nxt]) if guided else nxt)[:, None])

    ids = torch.stack(emitted, 1).cpu() if emitted else torch.zeros(B, 0, dtype=torch.long)  # (B, steps)
    lens = torch.stack(is_length, 1).cpu() if is_length else torch.zeros(B, 0, dtype=torch.bool)
    out: list[Sample] = []
    for b in range(B):
        block_lengths = levels.cpu()[ids[b][lens[b]] - cfg.codebook_size]  # (T - P,)
        n = int(block_lengths.sum()) + cfg.blocks - P  # steps this row used before it finished
        tokens = ids[b][:n][~lens[b][:n]]
        out.append((torch.cat([pre_tokens[b], tokens]), torch.cat([pre_lengths.cpu(), block_lengths])))
    return out


def _prefix_ids(
    cfg: GPTConfig, prefix: Sequence[Sample] | None, batch: int, device
) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
    """Validate a prefix; (its GPT ids after the class (B, P + n) or None, its tokens per row, block lengths (P,))."""
    if prefix is None:
        return None, [torch.zeros(0, dtype=torch.long)] * batch, torch.zeros(0, dtype=torch.long)
    if len(prefix) != batch:
        raise ValueError(f"prefix holds {len(prefix)} rows for {batch} labels")
    lengths = [torch.as_tensor(bl, dtype=torch.long).flatten().cpu() for _, bl in prefix]
    if any(not torch.equal(bl, lengths[0]) for bl in lengths):
        raise ValueError("every row's prefix must have the same block lengths (a fixed prefix assignment)")
    bl = lengths[0]
    if not 1 <= bl.numel() <= cfg.blocks or any(int(k) not in cfg.levels for k in bl):
        raise ValueError(f"prefix block lengths {bl.tolist()} must be 1 to {cfg.blocks} levels of {cfg.levels}")
    tokens = [torch.as_tensor(t, dtype=torch.long).flatten().cpu() for t, _ in prefix]
    ids = []
    for t in tokens:
        if t.numel() != int(bl.sum()) or (t.numel() and (int(t.min()) < 0 or int(t.max()) >= cfg.codebook_size)):
            raise ValueError(f"a prefix needs {int(bl.sum())} codebook ids in [0, {cfg.codebook_size})")
        ids.append(prefix_sequence(t, bl, cfg))
    return torch.stack(ids).to(device), tokens, bl


def prefix_sequence(tokens: torch.Tensor, block_lengths: torch.Tensor | Sequence[int], cfg: GPTConfig) -> torch.Tensor:
    """GPT ids of the first P blocks (``[len(k_1)] tok.. ... [len(k_P)] tok..``, no class): what a prefix forces."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).flatten()
    parts, start = [], 0
    for k in torch.as_tensor(block_lengths).flatten().tolist():
        parts += [torch.tensor([cfg.level_token(cfg.levels.index(int(k)))]), tokens[start : start + int(k)]]
        start += int(k)
    return torch.cat(parts)


def generate(
    model: GPT,
    labels: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    force_assignment: Sequence[int] | torch.Tensor | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    prefix: Sequence[Sample] | None = None,
) -> list[Sample]:
    """Sample one clip's tokens per label, batched, with a KV cache.

    Args:
        model: a :class:`GPT` (put it in eval mode and on its device first).
        labels: (B,) class ids; ``num_classes`` (the null class) samples unconditionally.
        cfg_scale: classifier-free guidance scale s (paper: 2.5 for GPT-B, 1.75 larger); 1 = none.
        temperature: softmax temperature; 0 means greedy.
        top_k, top_p: optional top-k / nucleus filtering (after masking).
        max_tokens: token budget: every sample has at most this many codebook ids.
        force_assignment: (T,) or (B, T) block lengths to use instead of sampling them.
        greedy: argmax instead of sampling.
        generator: source of all randomness (any device).
        prefix: B pairs ``(tokens, block_lengths (P,))`` (all rows with the same block lengths):
            the first P blocks of each row, teacher-forced (frame prediction); ``None``: none.

    Returns:
        B pairs ``(tokens (sum k_t,) long, block_lengths (T,) long)`` on the CPU, in label order
        (with a prefix, its tokens and block lengths come first).
    """
    with torch.inference_mode():
        return _generate(
            model, labels, cached=True, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
            max_tokens=max_tokens, force_assignment=force_assignment, greedy=greedy, generator=generator,
            prefix=prefix,
        )  # fmt: skip


def generate_uncached(
    model: GPT,
    labels: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    force_assignment: Sequence[int] | torch.Tensor | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    prefix: Sequence[Sample] | None = None,
) -> list[Sample]:
    """:func:`generate` recomputing the whole prefix at every step (reference for the KV cache; slow)."""
    with torch.inference_mode():
        return _generate(
            model, labels, cached=False, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
            max_tokens=max_tokens, force_assignment=force_assignment, greedy=greedy, generator=generator,
            prefix=prefix,
        )  # fmt: skip


@torch.inference_mode()
def decode_samples(tokenizer: Any, samples: Sequence[Sample], device: torch.device | str) -> torch.Tensor:
    """Pixels of sampled sequences with their tokenizer: (B, 3, F, H, W) float in [-1, 1]."""
    tokens = [t.to(device) for t, _ in samples]
    return tokenizer.decode(tokens, torch.stack([b for _, b in samples]).to(device)).float()
