"""Assignment policies: from router outputs to one assignment per clip, and token budgets (EVATok §3.3, §4).

The router (``evatok_cli.models.router``) only maps pixels to m^T numbers; every policy lives here
(STYLE rule 9), shared by the jobs that assign (encode, route, train tokenizer --stage final, eval):

- :func:`choose_assignments`: the classify head's argmax, or for the reward head
  ``argmax_a  w_q * Q_hat(a) - w_l * Lz(a)`` (PAPER Eq. 3-5 with the predicted quality);
- :func:`budget_assignments`: the reward head under a dataset-level token budget: maximise the total
  predicted quality subject to mean tokens <= budget, by Lagrangian relaxation (bisection on the
  per-token price lambda; each clip takes ``argmax_a Q_hat(a) - lambda * L(a)``), then a greedy fill
  of the slack left between the two bracketing prices;
- :func:`open_router`: one router directory, or several reward-head routers of one labels setup as
  an ensemble (:class:`RouterEnsemble`: their predicted qualities averaged);
- :class:`RouterPolicy`: a router directory (or an ensemble) as a policy, video -> (B, T) tokens per block;
- :func:`target_assignments`: a quality target instead of a trade-off (the paper's threshold
  baseline, a constant-quality mode): each clip's fewest tokens whose reconstruction by the
  tokenizer itself meets the target, block by block (see the function).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.checkpoint import OpenModel, open_model
from evatok_cli.metrics import Metric
from evatok_cli.models.blockwise import BlockwiseCodec
from evatok_cli.reward import DEFAULT_W_L, DEFAULT_W_Q, reward_weights


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def routing_scores(
    pred: Any, head: str, space: AssignmentSpace, w_q: float = DEFAULT_W_Q, w_l: float = DEFAULT_W_L
) -> np.ndarray:
    """(B, m^T) scores whose row argmax is the routed assignment: logits (classify), or w_q*Q_hat - w_l*Lz (reward)."""
    p = _numpy(pred)
    if p.ndim != 2 or p.shape[1] != len(space):
        raise ValueError(f"predictions must be (B, {len(space)}), got {p.shape}")
    if head == "classify":
        return p
    if head == "reward":
        return w_q * p - w_l * space.lengths_z()[None, :]
    raise ValueError(f"head must be 'classify' or 'reward', got {head!r}")


def starts_with(space: AssignmentSpace, prefix: Any) -> np.ndarray:
    """(m^T,) bool: which assignments of ``space`` start with the block lengths ``prefix`` (P,)."""
    want = [int(k) for k in prefix]
    if not 1 <= len(want) <= space.blocks or any(k not in space.levels for k in want):
        raise ValueError(f"prefix {want} must be 1 to {space.blocks} levels of {list(space.levels)}")
    return (np.asarray(space.table())[:, : len(want)] == np.asarray(want)[None, :]).all(axis=1)


def choose_assignments(
    pred: Any,
    head: str,
    space: AssignmentSpace,
    w_q: float = DEFAULT_W_Q,
    w_l: float = DEFAULT_W_L,
    prefix: Any = None,
) -> np.ndarray:
    """One assignment index per clip (deterministic: the first index wins ties).

    Args:
        pred: (B, m^T) router outputs (:meth:`Router.predict`): logits or Q_hat.
        head: ``classify`` (w_q, w_l are ignored: they were fixed when the labels were made) or
            ``reward`` (argmax of w_q * Q_hat - w_l * Lz).
        space: the router's assignment space.
        prefix: block lengths (P,) every chosen assignment must start with: the best-scoring such
            assignment (frame-prediction training data, PAPER §6: the most probable router
            assignment that starts with (512, 128)); ``None``: any assignment.

    Returns:
        (B,) int64 indices into ``space``.
    """
    scores = routing_scores(pred, head, space, w_q, w_l)
    if prefix is not None:
        scores = np.where(starts_with(space, prefix)[None, :], scores, -np.inf)
    return np.argmax(scores, axis=1).astype(np.int64)


class RouterEnsemble(torch.nn.Module):
    """Several reward-head routers of one labels setup as one: their predicted qualities averaged.

    Members agree on the space, the clip geometry and the head (checked by :func:`open_router`);
    ``config`` and ``space`` are the first member's. Per-clip offsets between members (a
    calibrated and a per-clip quality target) change no clip's choice: the argmax and the budget's
    Lagrangian both compare one clip's assignments with each other.
    """

    def __init__(self, members: list[Any]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.config, self.space = members[0].config, members[0].space

    @torch.no_grad()
    def predict(self, video: torch.Tensor) -> torch.Tensor:
        return torch.stack([m.predict(video) for m in self.members]).mean(0)


class OpenEnsemble(OpenModel):
    """:class:`OpenModel` of a :class:`RouterEnsemble`: ``dir``/``meta`` are the first member's."""

    def __init__(self, members: list[OpenModel]) -> None:
        super().__init__(RouterEnsemble([m.model for m in members]).eval(), members[0].dir, members[0].meta)
        self.members = members

    @property
    def dirs(self) -> list[Path]:
        return [m.dir for m in self.members]

    def record(self) -> dict[str, Any]:
        """``{path, sha256, preset, members}``: path and sha256 join the members' with ``+``."""
        recs = [m.record() for m in self.members]
        return {
            "path": "+".join(r["path"] for r in recs),
            "sha256": "+".join(r["sha256"] for r in recs),
            "preset": recs[0]["preset"],
            "members": recs,
        }


def router_label(router: str | Path | list[str | Path] | tuple) -> str:
    """How reports and stores name a router option: its path, or an ensemble's paths joined with ``+``."""
    return "+".join(map(str, router)) if isinstance(router, (list, tuple)) else str(router)


def open_router(paths: str | Path | list[str | Path] | tuple, *, device: Any = "cpu", ema: bool = True) -> OpenModel:
    """Open one router directory, or several as an ensemble (:class:`RouterEnsemble`).

    An ensemble's members must be reward-head routers with one space, one clip geometry and sampling,
    and one trade-off (their labels' w_q, w_l); a member that differs raises naming it and the field.

    Raises:
        CheckpointError: a path is not a router directory.
        ValueError: an ensemble of routers that do not agree (see above).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    members = [open_model(p, "router", device=device, ema=ema) for p in paths]
    if not members:
        raise ValueError("no router given")
    if len(members) == 1:
        return members[0]
    first = members[0]

    def facts(m: OpenModel) -> dict[str, Any]:
        c = m.model.config
        return {
            "space": m.model.space.to_dict(),
            "clip geometry": (c.frames, c.height, c.width),
            "clip sampling": m.meta.get("clip", {}).get("fps", "native"),
            "trade-off (w_q, w_l)": reward_weights(None, None, m.meta.get("labels")),
        }

    want = facts(first)
    for m in members:  # a classify member is refused before its other fields are compared
        if m.model.config.head != "reward":
            raise ValueError(
                f"{m.dir}: a {m.model.config.head!r}-head router cannot join an ensemble "
                "(it averages reward heads' predicted quality; train with --head reward)"
            )
        for field, value in facts(m).items():
            if value != want[field]:
                raise ValueError(f"{m.dir}: {field} {value} differs from {first.dir}'s {want[field]}")
    return OpenEnsemble(members)


class RouterPolicy:
    """A router as an assignment policy: video (B, 3, F, H, W) in [-1, 1] -> (B, T) tokens per block.

    Used by `evatok encode --router` and `evatok train tokenizer --stage final --router`: each clip
    gets the argmax of the router's scores (logits, or w_q * Q_hat - w_l * Lz for the reward head),
    among the assignments that start with ``prefix`` when one is given (``encode --router-prefix``).
    """

    def __init__(self, model: Any, space: AssignmentSpace, w_q: float, w_l: float, prefix: Any = None) -> None:
        self.model, self.space, self.w_q, self.w_l = model, space, w_q, w_l
        self.prefix = None if prefix is None else tuple(int(k) for k in prefix)
        if self.prefix is not None:
            starts_with(space, self.prefix)  # validate now
        self.table = torch.as_tensor(space.table())
        self.source: OpenModel | None = None  # the router directory, when loaded with :meth:`load`

    @classmethod
    def load(
        cls,
        path: str | Path | list[str | Path],
        space: AssignmentSpace,
        clip: tuple[int, int, int],
        device: Any,
        *,
        w_q: float | None = None,
        w_l: float | None = None,
        prefix: Any = None,
    ) -> RouterPolicy:
        """Load a router directory (or several: :func:`open_router`) and check it matches the
        tokenizer's space and clip geometry."""
        router = open_router(path, device=device)
        model, path = router.model, router.dir
        c = model.config
        if model.space != space:
            raise ValueError(
                f"{path}: router space {model.space.to_dict()} differs from the tokenizer's {space.to_dict()}"
            )
        if (c.frames, c.height, c.width) != tuple(clip):
            raise ValueError(
                f"{path}: router clips {c.frames}x{c.height}x{c.width} differ from the tokenizer's "
                f"{clip[0]}x{clip[1]}x{clip[2]}"
            )
        policy = cls(model, space, *reward_weights(w_q, w_l, router.meta.get("labels")), prefix=prefix)
        policy.source = router
        return policy

    @torch.no_grad()
    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        pred = self.model.predict(video)
        idx = choose_assignments(pred, self.model.config.head, self.space, self.w_q, self.w_l, prefix=self.prefix)
        return self.table[torch.as_tensor(idx)]


def _lagrange_choice(q: np.ndarray, lengths: np.ndarray, lam: float) -> np.ndarray:
    return np.argmax(q - lam * lengths[None, :], axis=1)


def budget_assignments(
    q_hat: Any, space: AssignmentSpace, budget: float, *, iters: int = 60
) -> tuple[np.ndarray, float]:
    """Assignments with mean tokens <= ``budget`` maximising the total predicted quality.

    Lagrangian relaxation of ``max sum_i Q_hat_i(a_i)  s.t.  mean_i L(a_i) <= budget``: for a price
    lambda >= 0 per token each clip takes ``argmax_a Q_hat_i(a) - lambda * L(a)``, whose mean length
    falls as lambda grows; bisection finds the smallest feasible price. The clips whose choice differs
    between the two bracketing prices are then upgraded greedily (best quality gain per extra token
    first) while the budget allows, so little of the budget is left unused.

    Args:
        q_hat: (N, m^T) predicted quality z-scores (the reward head's output).
        space: the assignment space (lengths L(a) in tokens).
        budget: mean tokens per clip allowed.

    Returns:
        ((N,) int64 indices, lambda: the price in quality units per token; 0 when the budget does not bind).

    Raises:
        ValueError: ``budget`` below the shortest assignment's length.
    """
    q = _numpy(q_hat)
    if q.ndim != 2 or q.shape[1] != len(space):
        raise ValueError(f"q_hat must be (N, {len(space)}), got {q.shape}")
    if budget < space.min_length:
        raise ValueError(f"budget {budget:g} tokens is below the shortest assignment ({space.min_length} tokens)")
    n = q.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0.0
    lengths = space.lengths().astype(np.float64)
    cap = budget * n

    def total(a: np.ndarray) -> float:
        return float(lengths[a].sum())

    a = _lagrange_choice(q, lengths, 0.0)
    if total(a) <= cap:
        return a.astype(np.int64), 0.0
    lo, hi = 0.0, 1.0
    while total(_lagrange_choice(q, lengths, hi)) > cap:  # at a high enough price every clip takes the shortest
        lo, hi = hi, hi * 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        if total(_lagrange_choice(q, lengths, mid)) > cap:
            lo = mid
        else:
            hi = mid
    a_hi, a_lo = _lagrange_choice(q, lengths, hi), _lagrange_choice(q, lengths, lo)
    rows = np.arange(n)
    gain = q[rows, a_lo] - q[rows, a_hi]
    cost = lengths[a_lo] - lengths[a_hi]
    cand = np.flatnonzero((a_lo != a_hi) & (cost > 0) & (gain > 0))
    order = cand[np.lexsort((cand, -(gain[cand] / cost[cand])))]
    used = total(a_hi)
    out = a_hi.copy()
    for i in order:
        if used + cost[i] <= cap:
            out[i], used = a_lo[i], used + cost[i]
    # one last pass over the slack: each clip's best upgrade that still fits, biggest gain first
    extra = lengths[None, :] - lengths[out][:, None]  # (N, M) extra tokens of every alternative
    up = np.where((extra > 0) & (extra <= cap - used), q - q[rows, out][:, None], -np.inf)
    choice = np.argmax(up, axis=1)
    g = up[rows, choice]
    for i in np.lexsort((rows, -g)):
        if not g[i] > 0:
            break
        if used + extra[i, choice[i]] <= cap:
            out[i], used = choice[i], used + extra[i, choice[i]]
    return out.astype(np.int64), float(hi)


# ------------------------------------------------------------------------- quality targets
TARGET_METRICS = ("psnr", "ssim", "lpips")


def parse_target(spec: str) -> tuple[str, float]:
    """``psnr=28`` / ``ssim=0.9`` / ``lpips=0.15`` -> (metric name, value); ValueError names the problem."""
    name, sep, value = spec.partition("=")
    name = name.strip().lower()
    if not sep or name not in TARGET_METRICS:
        raise ValueError(f"--target must be METRIC=VALUE with METRIC one of {', '.join(TARGET_METRICS)}, got {spec!r}")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"--target {spec!r}: {value!r} is not a number") from None
    if not np.isfinite(v) or (name in ("ssim", "lpips") and not 0.0 <= v <= 1.0) or (name == "psnr" and v <= 0):
        raise ValueError(f"--target {spec!r}: out of range ({'dB > 0' if name == 'psnr' else 'between 0 and 1'})")
    return name, v


@dataclass
class TargetChoice:
    """What :func:`target_assignments` chose: (B, T) tokens per block, (B, T) block values, (B,) met."""

    assignments: torch.Tensor
    block_values: torch.Tensor
    met: torch.Tensor

    @property
    def clip_values(self) -> torch.Tensor:
        """The clip metric as the search defines it: the mean of the block values."""
        return self.block_values.mean(1)


@torch.no_grad()
def target_assignments(model: Any, video: torch.Tensor, metric: Metric, target: float) -> TargetChoice:
    """Each clip's fewest tokens whose reconstruction meets ``target``, block by block.

    The tokenizer is block-causal: block t's pixels depend only on the levels of blocks 1..t. So
    block 1 takes the smallest level whose reconstruction of block 1 meets the target; given that
    level, block 2 the smallest that meets it; and so on (the prefix tree of the search walked along
    one path: T x m block evaluations per clip instead of the m + ... + m^T of the exact search).
    A block that no level brings to the target takes the largest level. When every block meets
    the target, so does the clip metric (their mean); ``met`` says which clips' clip metric does.

    This is the fewest tokens under a per-block target, not under a clip-mean target (a clip could
    trade a block below the target for one above it); a constant-quality mode, like a video codec's.

    Args:
        model: the tokenizer (eval mode) whose reconstructions are measured: the one that encodes.
        video: (B, 3, F, H, W) in [-1, 1] on the model's device.
        metric: a block metric (``evatok_cli.metrics.get_metric``); ``higher_is_better`` sets the direction.
        target: the value each block must reach (dB for PSNR).
    """
    codec = BlockwiseCodec(model)
    space, pt = model.space, model.config.temporal_patch
    m, T, B, dev = space.num_levels, space.blocks, video.shape[0], video.device
    levels = torch.tensor(space.levels, device=dev)
    rows = torch.arange(B, device=dev)
    chosen = torch.empty(B, T, dtype=torch.long, device=dev)
    values = torch.empty(B, T, dtype=torch.float64, device=dev)
    video = video.contiguous()
    state = codec.init(video)
    for t in range(T):
        child, _, pixels = codec.step(state.index_select(rows.repeat_interleave(m)), levels.repeat(B))
        block = video[:, :, t * pt : (t + 1) * pt].repeat_interleave(m, dim=0)
        v = metric(pixels, block, pt)[:, 0].double().view(B, m)
        ok = v >= target if metric.higher_is_better else v <= target
        j = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full_like(rows, m - 1))
        chosen[:, t], values[:, t] = levels[j], v[rows, j]
        state = child.index_select(rows * m + j)
    clip = values.mean(1)
    met = clip >= target if metric.higher_is_better else clip <= target
    return TargetChoice(chosen.cpu(), values.cpu(), met.cpu())


__all__ = [
    "RouterPolicy",
    "TargetChoice",
    "budget_assignments",
    "choose_assignments",
    "parse_target",
    "routing_scores",
    "target_assignments",
]
