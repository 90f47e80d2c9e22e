"""The assignment space of EVATok (paper §3, DESIGN §3).

A clip has T temporal blocks; block t receives k_t 1D tokens, k_t drawn from a sorted level set K
of size m. An assignment is the tuple (k_1, ..., k_T); there are m**T of them. Assignments are
numbered as mixed-radix numbers over the *level positions*, first block most significant, so for
the paper's space (K = {32, 64, 128, 256, 512}, T = 4) index 0 is (32, 32, 32, 32) and index 624 is
(512, 512, 512, 512).

The length statistics (mean and std of L(a) = sum_t k_t under the uniform distribution over all
assignments) are exact: blocks are independent under that distribution, so the mean is T times the
per-level mean and the variance T times the per-level variance.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class AssignmentSpace:
    """All token assignments a = (k_1..k_T) with each k_t in ``levels``.

    Args:
        levels: allowed tokens-per-block counts, strictly increasing positive integers.
        blocks: number of temporal blocks T.
    """

    levels: tuple[int, ...]
    blocks: int
    _level_pos: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        levels = tuple(int(k) for k in self.levels)
        if not levels:
            raise ValueError("AssignmentSpace needs at least one level")
        if any(k <= 0 for k in levels):
            raise ValueError(f"levels must be positive, got {levels}")
        if list(levels) != sorted(set(levels)):
            raise ValueError(f"levels must be strictly increasing, got {levels}")
        if int(self.blocks) < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "blocks", int(self.blocks))
        object.__setattr__(self, "_level_pos", {k: i for i, k in enumerate(levels)})

    # ------------------------------------------------------------------ sizes
    @property
    def num_levels(self) -> int:
        """m, the number of levels."""
        return len(self.levels)

    def __len__(self) -> int:
        """m**T, the number of assignments."""
        return self.num_levels**self.blocks

    @property
    def max_length(self) -> int:
        return self.levels[-1] * self.blocks

    @property
    def min_length(self) -> int:
        return self.levels[0] * self.blocks

    # ------------------------------------------------------------- index <-> tuple
    def to_tuple(self, index: int) -> tuple[int, ...]:
        """Assignment index -> (k_1, ..., k_T)."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"assignment index {index} out of range [0, {len(self)})")
        pos = []
        for _ in range(self.blocks):
            index, r = divmod(index, self.num_levels)
            pos.append(r)
        return tuple(self.levels[p] for p in reversed(pos))

    def to_index(self, assignment: Sequence[int]) -> int:
        """(k_1, ..., k_T) -> assignment index (first block most significant)."""
        if len(assignment) != self.blocks:
            raise ValueError(f"assignment {tuple(assignment)} has {len(assignment)} blocks, expected {self.blocks}")
        index = 0
        for k in assignment:
            pos = self._level_pos.get(int(k))
            if pos is None:
                raise ValueError(f"{int(k)} is not a level of this space {self.levels}")
            index = index * self.num_levels + pos
        return index

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        """All assignments in index order."""
        return iter(itertools.product(self.levels, repeat=self.blocks))

    def table(self) -> np.ndarray:
        """(m**T, T) int64 array: row i is assignment i."""
        return np.array(list(self), dtype=np.int64).reshape(len(self), self.blocks)

    def uniform(self, k: int) -> tuple[int, ...]:
        """The uniform assignment (k, ..., k)."""
        if k not in self._level_pos:
            raise ValueError(f"{k} is not a level of this space {self.levels}")
        return (int(k),) * self.blocks

    # ------------------------------------------------------------------ lengths
    def length(self, assignment: Sequence[int] | int) -> int:
        """L(a) = sum_t k_t; accepts a tuple or an index."""
        if isinstance(assignment, (int, np.integer)):
            assignment = self.to_tuple(int(assignment))
        else:
            self.to_index(assignment)  # validates
        return int(sum(int(k) for k in assignment))

    def lengths(self) -> np.ndarray:
        """(m**T,) int64 array of L(a) for every assignment, in index order."""
        return self.table().sum(axis=1)

    @property
    def length_mean(self) -> float:
        """Exact mean of L(a) over the uniform distribution on all assignments."""
        return self.blocks * float(np.mean(self.levels))

    @property
    def length_std(self) -> float:
        """Exact (population) std of L(a) over the uniform distribution on all assignments."""
        return math.sqrt(self.blocks * float(np.var(np.asarray(self.levels, dtype=np.float64))))

    def length_z(self, assignment: Sequence[int] | int) -> float:
        """The z-scored length (PAPER §3, Eq. 7)."""
        return (self.length(assignment) - self.length_mean) / self.length_std if self.length_std > 0 else 0.0

    def lengths_z(self) -> np.ndarray:
        """(m**T,) float64 z-scored lengths in index order."""
        if self.length_std == 0:
            return np.zeros(len(self))
        return (self.lengths() - self.length_mean) / self.length_std

    # ----------------------------------------------------------------- sampling
    def sample(self, generator: np.random.Generator, n: int | None = None) -> np.ndarray:
        """Uniform random assignments (each block's level independent): (T,) or (n, T) int64."""
        shape = (self.blocks,) if n is None else (n, self.blocks)
        return np.asarray(self.levels, dtype=np.int64)[generator.integers(0, self.num_levels, size=shape)]

    # ---------------------------------------------------------------- parsing
    def parse(self, text: str) -> tuple[int, ...]:
        """Parse ``uniform:K`` or ``fixed:k1,k2,...`` (or a bare ``k1,k2,...``) into a tuple."""
        text = text.strip()
        m = re.fullmatch(r"uniform:(\d+)", text)
        if m:
            return self.uniform(int(m.group(1)))
        body = text.removeprefix("fixed:")
        try:
            parts = tuple(int(p) for p in body.split(","))
        except ValueError:
            raise ValueError(f"cannot parse assignment {text!r}: expected uniform:K or fixed:k1,...,kT") from None
        self.to_index(parts)
        return parts

    # ---------------------------------------------------------------- (de)serialise
    def to_dict(self) -> dict:
        return {"levels": list(self.levels), "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: dict) -> AssignmentSpace:
        unknown = set(d) - {"levels", "blocks"}
        if unknown:
            raise ValueError(f"unknown AssignmentSpace fields: {sorted(unknown)}")
        return cls(levels=tuple(d["levels"]), blocks=int(d["blocks"]))


PAPER_SPACE = AssignmentSpace(levels=(32, 64, 128, 256, 512), blocks=4)


# A labelling whose best assignments pile up here tells the router nothing (it learns a constant).
COLLAPSE_SHARE = 0.5
COLLAPSE_MIN_CLIPS = 8


def label_spread(space: AssignmentSpace, best: Sequence[int] | np.ndarray) -> dict:
    """How the search's best assignments spread over the space, and whether they collapsed.

    Collapsed (with at least ``COLLAPSE_MIN_CLIPS`` clips): one assignment, the shortest one or the
    longest one holds at least ``COLLAPSE_SHARE`` of the clips. A router trained on such labels
    learns a constant; ``suggestion`` says which reward weight to move.

    Args:
        space: the assignment space.
        best: the best assignment index of every clip.

    Returns:
        A JSON-ready dict: ``clips``, ``distinct``, ``entropy_bits``, ``top`` (the most common
        assignment and its ``share``), ``shortest_share``, ``longest_share``,
        ``mean_tokens``, ``collapsed`` and, when collapsed, ``reason`` and ``suggestion``.
    """
    idx = np.asarray(best, dtype=np.int64).ravel()
    n = int(idx.size)
    out: dict = {
        "clips": n,
        "distinct": 0,
        "entropy_bits": 0.0,
        "top": None,
        "shortest_share": 0.0,
        "longest_share": 0.0,
        "mean_tokens": 0.0,
        "collapsed": False,
    }
    if n == 0:
        return out
    values, counts = np.unique(idx, return_counts=True)
    p = counts / n
    lengths = space.lengths()[idx]
    top = int(values[np.argmax(counts)])
    out.update(
        distinct=int(values.size),
        entropy_bits=round(float(-(p * np.log2(p)).sum()), 3),
        top={"assignment": list(space.to_tuple(top)), "share": round(float(p.max()), 3)},
        shortest_share=round(float((lengths == space.min_length).mean()), 3),
        longest_share=round(float((lengths == space.max_length).mean()), 3),
        mean_tokens=round(float(lengths.mean()), 2),
    )
    if n < COLLAPSE_MIN_CLIPS:
        return out
    if out["shortest_share"] >= COLLAPSE_SHARE:
        reason = f"{out['shortest_share']:.0%} of the clips got the shortest assignment"
        suggestion = (
            "the length term dominates: lower --w-l (or raise --w-q), or train the proxy longer "
            "so that more tokens visibly help"
        )
    elif out["longest_share"] >= COLLAPSE_SHARE:
        reason = f"{out['longest_share']:.0%} of the clips got the longest assignment"
        suggestion = "the quality term dominates: raise --w-l (or lower --w-q)"
    elif out["top"]["share"] >= COLLAPSE_SHARE:
        reason = f"{out['top']['share']:.0%} of the clips got {tuple(out['top']['assignment'])}"
        suggestion = (
            "the labels hardly depend on the clip: train the proxy longer, check its calibration, or move --w-l"
        )
    else:
        return out
    out.update(collapsed=True, reason=reason, suggestion=suggestion)
    return out
