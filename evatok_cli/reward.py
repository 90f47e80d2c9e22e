"""The proxy reward of EVATok (PAPER §3.2, Eq. 3-7), its NaN rule and its default weights.

For a clip and an assignment a, with M(a) the clip metric of a's reconstruction,

    R(a) = w_q * Q(a) - w_l * L(a),   Q(a) = s * (M(a) - mean) / std,   L(a) = lengths_z(a)

with s = +1 when a higher metric is better (PSNR, SSIM) and -1 otherwise (LPIPS, PAPER §3:
Q = -z(LPIPS)); mean/std are the metric's :class:`CalibrationStats`; L is the length z-scored
exactly over the uniform assignment space. One formula for the search, router training, routing
and evaluation.

**NaN rule.** An assignment the search did not explore has a NaN metric, hence a NaN reward; it is
never chosen (:func:`nanargmax_rows` treats it as -inf) and a clip with no explored assignment at
all is an error (:func:`best_assignments`).

**Weights.** The paper's defaults are w_q = 1.2, w_l = 0.8 (:data:`DEFAULT_W_Q`,
:data:`DEFAULT_W_L`); a router or labels store records the weights it was made with, and
:func:`reward_weights` resolves a caller's (w_q, w_l) against such a record.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from evatok_cli.assignments import AssignmentSpace
from evatok_cli.config import save_json
from evatok_cli.store import open_store

DEFAULT_W_Q, DEFAULT_W_L = 1.2, 0.8  # PAPER §3: the default router's weights


def reward_weights(
    w_q: float | None = None, w_l: float | None = None, recorded: Mapping[str, Any] | None = None
) -> tuple[float, float]:
    """(w_q, w_l): each given one, else the ``recorded`` one (a router's or store's), else the paper's."""
    recorded = recorded or {}
    return (
        float(recorded.get("w_q", DEFAULT_W_Q)) if w_q is None else float(w_q),
        float(recorded.get("w_l", DEFAULT_W_L)) if w_l is None else float(w_l),
    )


@dataclass(frozen=True)
class CalibrationStats:
    """Mean and std of the clip metric over random (clip, assignment) pairs (PAPER §3.2, Eq. 6).

    Attributes:
        mean, std: of the clip metric (population std).
        count: pairs that went into them.
        seed: seed of the draw.
        metric: metric name ("psnr", "ssim", "lpips").
        proxy_sha256: sha256 of the proxy's weights (``weights_sha256``), or None if unknown.
    """

    mean: float
    std: float
    count: int
    seed: int
    metric: str = ""
    proxy_sha256: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean) and math.isfinite(self.std)) or self.std <= 0:
            raise ValueError(f"calibration needs a finite mean and a positive std, got {self.mean}, {self.std}")

    def attrs(self) -> dict[str, Any]:
        """The ``search.calibration`` attrs of a labels store."""
        return {"mean": float(self.mean), "std": float(self.std), "count": int(self.count), "seed": int(self.seed)}

    def to_dict(self) -> dict[str, Any]:
        """The ``--stats`` file content."""
        return {"metric": self.metric, **self.attrs(), "proxy_sha256": self.proxy_sha256}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        save_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationStats:
        """Read a ``--stats`` JSON file, or the calibration of an existing labels store."""
        path = Path(path)
        if path.is_dir():
            attrs = open_store(path, allow_unfinished=True).attrs
            if "search" not in attrs:
                raise ValueError(f"{path} is a token store without search attrs (not a labels store)")
            c = attrs["search"]["calibration"]
            return cls(
                float(c["mean"]),
                float(c["std"]),
                int(c["count"]),
                int(c["seed"]),
                attrs["search"]["metric"],
                attrs.get("tokenizer", {}).get("sha256"),
            )
        try:
            d = json.loads(path.read_text())
            return cls(
                float(d["mean"]),
                float(d["std"]),
                int(d["count"]),
                int(d.get("seed", 0)),
                str(d.get("metric", "")),
                d.get("proxy_sha256"),
            )
        except FileNotFoundError:
            raise ValueError(f"--stats {path}: no such file") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"--stats {path}: not a calibration file (need metric, mean, std, count, seed): {e}"
            ) from None


def rewards(
    metric_values: np.ndarray | Tensor | Sequence[float],
    stats: CalibrationStats | Mapping[str, float],
    space: AssignmentSpace,
    w_q: float,
    w_l: float,
    higher_is_better: bool,
) -> np.ndarray:
    """Proxy rewards R = w_q*Q - w_l*L of clip metric vectors (PAPER §3.2, Eq. 3-7).

    Args:
        metric_values: (..., m**T) clip metric of every assignment in index order (NaN stays NaN).
        stats: calibration with ``mean`` and ``std`` (a :class:`CalibrationStats` or a mapping).
        space: the assignment space (its exact length z-scores give L).
        w_q, w_l: quality and length weights.
        higher_is_better: orientation of the metric (True for PSNR/SSIM, False for LPIPS).

    Returns:
        float64 array of the shape of ``metric_values``.
    """
    m = metric_values.detach().cpu().numpy() if isinstance(metric_values, Tensor) else metric_values
    m = np.asarray(m, dtype=np.float64)
    if m.shape[-1:] != (len(space),):
        raise ValueError(f"metric vectors must end with {len(space)} assignments, got shape {m.shape}")
    mean, std = (stats.mean, stats.std) if isinstance(stats, CalibrationStats) else (stats["mean"], stats["std"])
    if not std > 0:
        raise ValueError(f"calibration std must be > 0, got {std}")
    q = (m - float(mean)) / float(std)
    if not higher_is_better:
        q = -q
    return float(w_q) * q - float(w_l) * space.lengths_z()


def best_assignments(reward: np.ndarray) -> np.ndarray:
    """(N, m**T) rewards -> (N,) int64 index of the best explored assignment (ties: lowest index)."""
    r = np.asarray(reward, dtype=np.float64)
    if np.isnan(r).all(axis=-1).any():
        raise ValueError("a clip has no scored assignment")
    return np.nanargmax(r, axis=-1).astype(np.int64)


def nanargmax_rows(x: np.ndarray) -> np.ndarray:
    """Row-wise argmax ignoring NaN (first index on ties; a row of NaN gives 0)."""
    return np.argmax(np.where(np.isnan(x), -np.inf, x), axis=1).astype(np.int64)


__all__ = [
    "DEFAULT_W_L",
    "DEFAULT_W_Q",
    "CalibrationStats",
    "best_assignments",
    "nanargmax_rows",
    "reward_weights",
    "rewards",
]
