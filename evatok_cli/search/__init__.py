"""Stage 2 of EVATok: the search for each clip's best assignment under the proxy reward (PAPER §3).

**Reward.** The clip metric M(a) of an assignment a is the mean of its T per-block metric values
(blocks have equal frames, so it equals the per-frame mean); the reward R = w_q*Q - w_l*L is
:mod:`evatok_cli.reward` (one formula for search, router training and routing).

**Exact search (prefix tree).** Both tokenizer halves are block-causal: block t's pixels depend
only on (k_1..k_t). Level t of the tree holds the m^t prefixes; each node runs *one* block
(``encode_block`` + ``decode_block`` from its parent's cached state, :class:`BlockwiseCodec`) and
scores that block against the target. M(a) is the mean of the block values along a's path. Cost:
m + m^2 + ... + m^T block evaluations per clip (780 for m=5, T=4) instead of T * m^T = 2500 for
decoding every assignment whole (:func:`brute_force_search`, the reference). The tree is walked
depth-first in steps of at most ``chunk`` branches, so memory stays bounded by ~T chunks of prefix
states whatever the batch size. Near the root a step expands every branch by all m levels at once;
deeper, a step gives all its branches the *same* level, so no branch is padded to a larger k
(a mixed step runs every branch's new block at the largest k of the step). The last block (the
m^T leaves, most of the work) runs every level of up to ``chunk`` parents in one pass
(``BlockwiseCodec.step_levels``): the m children attend to their parent's cached prefix instead of
each copying it, and no child state is built.

**Beam search** (``width`` W) keeps the W best prefixes of each clip per level. A prefix is ranked
by the reward of its *neutral completion*: the remaining blocks are assumed to score the calibration
mean and to get the mean level's length. Because every prefix of a level shares the same number of
remaining blocks, this is the prefix's own partial reward
``w_q*s*sum_{u<=t}(v_u - mean)/(T*std) - w_l*sum_{u<=t}(k_u - mean_level)/std_L`` (v_u the block
metric values) and the ranking
does not depend on which fixed completion one assumes. Unexplored assignments get NaN; a W of at
least m^(T-1) explores the whole tree (= exact).

**Modules.** :mod:`~evatok_cli.search.tree` (exact, beam and brute-force search),
:mod:`~evatok_cli.search.calibration` (the metric's mean/std), :mod:`~evatok_cli.search.job`
(:func:`search_dataset`, the ``evatok search`` job).

**Datasets.** :func:`search_dataset` runs the search over videos and writes a *labels store* (a
token store v1, docs/formats.md and docs/pipeline.md "Search"), one sample per clip, sharded over
torchrun ranks by video, resumable, deterministic.
"""

from __future__ import annotations

from evatok_cli.reward import CalibrationStats, best_assignments, rewards
from evatok_cli.search.calibration import calibrate
from evatok_cli.search.job import SearchSummary, search_dataset
from evatok_cli.search.tree import (
    SearchResult,
    SearchStats,
    beam_search,
    brute_force_search,
    default_chunk,
    exact_search,
    reconstruct,
)

__all__ = [
    "CalibrationStats",
    "SearchResult",
    "SearchStats",
    "SearchSummary",
    "beam_search",
    "best_assignments",
    "brute_force_search",
    "calibrate",
    "default_chunk",
    "exact_search",
    "reconstruct",
    "rewards",
    "search_dataset",
]
