"""Sampling: structural validity, token budget, forced assignments, KV cache == recompute, CFG, overfit,
teacher-forced prefixes (frame prediction)."""

from __future__ import annotations

import time

import pytest
import torch

from evatok_cli.models.gpt import GPT, GPTConfig, build_sequence, gpt_config, pad_batch, parse_sequence
from evatok_cli.sampling import (
    apply_cfg,
    generate,
    generate_uncached,
    prefix_sequence,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)

SMALL = dict(codebook_size=16, levels=(2, 4, 8), blocks=3, num_classes=5)


@pytest.fixture(autouse=True)
def _one_thread():
    # these models are tiny: intra-op threads only add sync overhead (10x slower on a busy 2-core box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(seed: int, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(gpt_config("tiny", **{**SMALL, **overrides})).eval()


def assert_valid(samples, cfg: GPTConfig, labels, max_tokens: int | None = None) -> None:
    assert len(samples) == len(labels)
    for (tokens, block_lengths), label in zip(samples, labels):
        assert tokens.dtype == block_lengths.dtype == torch.long
        assert block_lengths.shape == (cfg.blocks,)
        assert all(int(k) in cfg.levels for k in block_lengths)
        assert tokens.shape == (int(block_lengths.sum()),)
        assert ((tokens >= 0) & (tokens < cfg.codebook_size)).all()
        # the full sequence parses back (structure, class at position 0)
        t, bl, lab = parse_sequence(build_sequence(tokens, block_lengths, int(label), cfg), cfg)
        assert torch.equal(t, tokens) and torch.equal(bl, block_lengths) and lab == int(label)
        if max_tokens is not None:
            assert len(tokens) <= max_tokens


# -------------------------------------------------------------------------------- validity
SPACES = [
    SMALL,
    dict(codebook_size=7, levels=(1, 3), blocks=4, num_classes=2),
    dict(codebook_size=32, levels=(5,), blocks=2, num_classes=0),
]
MODES = [dict(), dict(cfg_scale=3.0), dict(temperature=1.5, top_k=5), dict(top_p=0.9, cfg_scale=0.5), dict(greedy=True)]


@pytest.mark.parametrize("seed", range(9))
def test_samples_are_structurally_valid(seed: int) -> None:
    # varied small spaces and architectures; untrained weights scaled up so that the raw model often
    # puts its mass on the wrong kind of id: only the masking keeps the structure valid
    model = random_model(seed, **SPACES[seed % 3], init_std=0.5)
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, cfg.num_classes + 1, (12,), generator=g)
    min_total = cfg.blocks * cfg.levels[0]
    budgets = [None, min_total, min_total + cfg.levels[-1] // 2 + 1, cfg.blocks * cfg.levels[-1]]
    for budget in budgets:
        for kw in MODES:
            samples = generate(model, labels, max_tokens=budget, generator=g, **kw)
            assert_valid(samples, cfg, labels.tolist(), budget)
            if budget == min_total:
                assert all(len(t) == min_total for t, _ in samples)


def test_budget_binds_and_is_checked() -> None:
    model = random_model(0, init_std=0.5)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(4)
    free = generate(model, labels, generator=g)
    assert max(len(t) for t, _ in free) > 10  # unconstrained samples do exceed the budget used below
    assert_valid(generate(model, labels, max_tokens=10, generator=g), model.config, labels.tolist(), 10)
    with pytest.raises(ValueError, match="max_tokens"):
        generate(model, labels, max_tokens=5)  # < 3 blocks x level 2


def test_force_assignment() -> None:
    model = random_model(1)
    labels = torch.tensor([0, 1, 2])
    forced = torch.tensor([[8, 2, 4], [2, 2, 2], [4, 8, 8]])
    for samples in (generate(model, labels, force_assignment=forced, generator=torch.Generator().manual_seed(0)),
                    generate(model, labels, force_assignment=[8, 2, 4], cfg_scale=2.0, greedy=True)):  # fmt: skip
        assert_valid(samples, model.config, labels.tolist())
    assert [bl.tolist() for _, bl in generate(model, labels, force_assignment=forced)] == forced.tolist()
    with pytest.raises(ValueError, match="non-levels"):
        generate(model, labels, force_assignment=[3, 2, 2])
    with pytest.raises(ValueError, match="max_tokens"):
        generate(model, labels, force_assignment=[8, 8, 8], max_tokens=20)


def test_bad_arguments() -> None:
    model = random_model(0)
    with pytest.raises(ValueError, match="labels"):
        generate(model, torch.tensor([6]))
    with pytest.raises(ValueError):
        generate(model, torch.tensor([0]), top_p=0.0)
    assert generate(model, torch.tensor([], dtype=torch.long)) == []


# ---------------------------------------------------------------------------- equivalences
def _same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("seed", range(3))
def test_kv_cache_greedy_equals_recompute(seed: int) -> None:
    model = random_model(seed, tie_embeddings=bool(seed % 2), init_std=0.1)
    labels = torch.arange(6) % 6
    cached = generate(model, labels, greedy=True)
    assert _same(cached, generate_uncached(model, labels, greedy=True))
    assert _same(
        generate(model, labels, greedy=True, cfg_scale=2.0),
        generate_uncached(model, labels, greedy=True, cfg_scale=2.0),
    )
    assert len({tuple(t.tolist()) for t, _ in cached}) > 1  # not trivially identical samples


def test_seeded_sampling_reproducible_and_cache_matches() -> None:
    model = random_model(5, init_std=0.1)
    labels = torch.tensor([0, 1, 2, 3])
    run = lambda fn, seed: fn(model, labels, cfg_scale=1.5, top_k=8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert _same(run(generate, 7), run(generate, 7))
    assert _same(run(generate, 7), run(generate_uncached, 7))
    assert not _same(run(generate, 7), run(generate, 8))


def test_cfg_scale_one_is_plain_conditional() -> None:
    model = random_model(6, init_std=0.1)
    labels = torch.tensor([0, 1, 2, 3, 4])
    cond = torch.randn(5, 23)
    torch.testing.assert_close(apply_cfg(cond, torch.randn(5, 23), 1.0), cond)
    plain = generate(model, labels, generator=torch.Generator().manual_seed(3))  # scale 1: no uncond rows
    # the guided path (conditional + null-class rows batched) at a scale of 1 + 1e-6 samples the same
    guided = generate(model, labels, cfg_scale=1.0 + 1e-6, generator=torch.Generator().manual_seed(3))
    assert _same(plain, guided)
    assert _same(plain, generate(model, labels, cfg_scale=1.0, generator=torch.Generator().manual_seed(3)))


# ------------------------------------------------------------------------------ logit filters
def test_filters_and_sampler() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, float("-inf")]])
    assert torch.isfinite(top_k_filter(logits, 2)).tolist() == [[False, True, False, True, False]]
    assert torch.isfinite(top_p_filter(logits, 1e-3)).tolist() == [[False, True, False, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).tolist() == [[True, True, True, True, False]]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_from_logits(logits.expand(1000, -1), g) for _ in range(5)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.02, rtol=0)
    assert freq[4] == 0


# -------------------------------------------------------------------------------------- overfit
def test_tiny_gpt_memorises_and_reproduces_sequences() -> None:
    """A `tiny` GPT trained on a handful of sequences reproduces each, greedily, from its class."""
    start = time.monotonic()
    cfg = gpt_config("tiny", codebook_size=16, levels=(2, 4, 8), blocks=3, num_classes=6)
    torch.manual_seed(0)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(0)
    assignments = [(2, 4, 8), (8, 8, 2), (4, 4, 4), (2, 2, 2), (8, 2, 8), (4, 8, 2)]
    clips = [(torch.randint(0, 16, (sum(a),), generator=g), torch.tensor(a)) for a in assignments]
    seqs = [build_sequence(t, bl, c, cfg) for c, (t, bl) in enumerate(clips)]
    input_ids, targets, _ = pad_batch(seqs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        _, loss = model(input_ids, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 1e-3:
            break
    model.eval()
    assert loss.item() < 0.05
    samples = generate(model, torch.arange(6), greedy=True)
    for (tokens, block_lengths), (want_t, want_bl) in zip(samples, clips):
        assert block_lengths.tolist() == want_bl.tolist()
        assert torch.equal(tokens, want_t)
    assert time.monotonic() - start < 30


# --------------------------------------------------------------------------- prefix (frame prediction)
def _prefix(seed: int, rows: int, block_lengths=(8, 2)) -> list:
    g = torch.Generator().manual_seed(seed)
    bl = torch.tensor(block_lengths)
    return [(torch.randint(0, SMALL["codebook_size"], (int(bl.sum()),), generator=g), bl) for _ in range(rows)]


def test_prefix_is_teacher_forced_and_the_continuation_is_valid() -> None:
    model = random_model(7, init_std=0.5)
    cfg = model.config
    labels = torch.tensor([0, 1, 5, 2])  # 5: the null class
    pre = _prefix(0, 4)
    for kw in MODES:
        samples = generate(model, labels, prefix=pre, generator=torch.Generator().manual_seed(1), **kw)
        assert_valid(samples, cfg, labels.tolist())
        for (tokens, bl), (pt, pbl) in zip(samples, pre):
            assert torch.equal(tokens[:10], pt) and bl[:2].tolist() == pbl.tolist()
    # budgets and forced assignments count the prefix
    budget = generate(model, labels, prefix=pre, max_tokens=13, generator=torch.Generator().manual_seed(1))
    assert all(len(t) <= 13 for t, _ in budget)
    forced = generate(model, labels, prefix=pre, force_assignment=[8, 2, 4])
    assert all(bl.tolist() == [8, 2, 4] for _, bl in forced)
    # a prefix of every block: nothing left to sample, the prefix comes back as it is
    full = _prefix(3, 2, (2, 4, 8))
    assert _same(generate(model, torch.tensor([0, 1]), prefix=full), full)


def test_prefix_conditions_the_continuation_and_cache_matches_recompute() -> None:
    model = random_model(8, init_std=0.1)
    labels = torch.tensor([0, 1, 2])
    pre = _prefix(0, 3)
    cached = generate(model, labels, prefix=pre, greedy=True)
    assert _same(cached, generate_uncached(model, labels, prefix=pre, greedy=True))
    seeded = dict(cfg_scale=2.0, top_k=8)
    assert _same(
        generate(model, labels, prefix=pre, generator=torch.Generator().manual_seed(4), **seeded),
        generate_uncached(model, labels, prefix=pre, generator=torch.Generator().manual_seed(4), **seeded),
    )
    other = generate(model, labels, prefix=_prefix(1, 3), greedy=True)
    assert any(not torch.equal(a[0][10:], b[0][10:]) for a, b in zip(cached, other))  # the prefix matters
    # the first sampled step sees exactly the teacher-forced sequence: its logits equal a full forward's
    seq = torch.cat([torch.tensor([model.config.class_token(0)]), prefix_sequence(*pre[0], model.config)])
    with torch.inference_mode():
        full = model(seq[None])[0][0, -1]
        cache = model.new_cache(1)
        torch.testing.assert_close(model.prefill(seq[None], cache)[0], full)


def test_prefix_cfg_scale_one_is_plain_conditional() -> None:
    model = random_model(9, init_std=0.1)
    labels = torch.tensor([0, 1, 2, 3, 4])
    pre = _prefix(2, 5)
    run = lambda s: generate(model, labels, prefix=pre, cfg_scale=s, generator=torch.Generator().manual_seed(3))  # noqa: E731
    plain = run(1.0)  # no null-class rows at all
    assert _same(plain, run(1.0 + 1e-6))  # the guided path (conditional + null rows, both prefixed) at scale ~1
    assert _same(plain, generate_uncached(model, labels, prefix=pre, generator=torch.Generator().manual_seed(3)))
    assert not _same(plain, run(4.0))


def test_prefix_errors() -> None:
    model = random_model(0)
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="same block lengths"):
        generate(model, labels, prefix=[*_prefix(0, 1), *_prefix(0, 1, (2, 2))])
    with pytest.raises(ValueError, match="rows"):
        generate(model, labels, prefix=_prefix(0, 3))
    with pytest.raises(ValueError, match="levels"):
        generate(model, labels, prefix=_prefix(0, 2, (3, 2)))
    with pytest.raises(ValueError, match="codebook ids"):
        generate(model, labels, prefix=[(torch.zeros(9, dtype=torch.long), torch.tensor([8, 2]))] * 2)
    with pytest.raises(ValueError, match="disagrees"):
        generate(model, labels, prefix=_prefix(0, 2), force_assignment=[2, 2, 2])
    with pytest.raises(ValueError, match="max_tokens"):
        generate(model, labels, prefix=_prefix(0, 2), max_tokens=11)
