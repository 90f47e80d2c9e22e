"""The best assignment of a clip from its reward vector, and the one rule for unscored assignments.

Rewards (PAPER §3.2, Eq. 3-7: R = w_q*Q - w_l*L) come as (..., m**T) float arrays in assignment
index order. **NaN marks an assignment that was not scored** (a beam search did not reach it, or it
is outside the subset asked about); every other value, ±inf included, is a score.

The rule, used by the search (labels), routing targets and evaluation alike:

- a clip's best assignment is the argmax of its *scored* rewards, ties to the lowest index;
- a clip with no scored reward has no best assignment: :data:`NO_ASSIGNMENT` (-1). It is never
  replaced by a guess such as index 0; each caller decides what a missing best means for it (the
  search refuses to write a label without one, evaluation leaves the clip out).
"""

from __future__ import annotations

import numpy as np

NO_ASSIGNMENT = -1
"""What :func:`best_assignments` returns for a clip with no scored reward."""


def best_assignments(reward: np.ndarray) -> np.ndarray:
    """(..., n) rewards -> (...,) int64 index of the best scored entry; -1 where none is scored.

    Args:
        reward: float rewards; NaN = not scored (module docstring).

    Returns:
        int64 array of the leading shape: the lowest index among the largest scored rewards, or
        :data:`NO_ASSIGNMENT` for a row with no scored entry.
    """
    r = np.asarray(reward, dtype=np.float64)
    if r.ndim == 0 or r.shape[-1] == 0:
        raise ValueError(f"rewards must have a non-empty last axis, got shape {r.shape}")
    scored = ~np.isnan(r)
    top = np.where(scored, r, -np.inf).max(axis=-1, keepdims=True)  # -inf rewards are still scores
    best = np.argmax(scored & (r == top), axis=-1).astype(np.int64)
    return np.where(scored.any(axis=-1), best, NO_ASSIGNMENT).astype(np.int64)
