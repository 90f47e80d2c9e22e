"""Learning-rate schedules as pure functions of the step (so resuming needs only the step)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, total: int, warmup: int, max_lr: float, min_lr: float) -> float:
    """Linear warmup to ``max_lr``, then cosine decay to ``min_lr`` at ``total`` (PAPER §2: 1e-4 -> 1e-6)."""
    if warmup > 0 and step < warmup:
        return max_lr * (step + 1) / warmup
    if total <= warmup:
        return max_lr
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * t))


def wsd(step: int, *, total: int, max_lr: float, warmup: int = 0, decay_frac: float = 0.2) -> float:
    """Warmup-stable-decay (PAPER §6): constant for the first 1 - decay_frac, then linear to 0."""
    if warmup > 0 and step < warmup:
        return max_lr * (step + 1) / warmup
    decay_start = int(total * (1.0 - decay_frac))
    if step < decay_start:
        return max_lr
    return max_lr * max(0.0, (total - step) / max(1, total - decay_start))
