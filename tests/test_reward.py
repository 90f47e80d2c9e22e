"""The one NaN rule for best assignments (evatok_cli.reward), shared by search and routing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evatok_cli import route, search
from evatok_cli.assignments import AssignmentSpace
from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config
from evatok_cli.reward import NO_ASSIGNMENT, best_assignments

nan, inf = np.nan, np.inf


def test_argmax_of_scored_entries_ties_lowest_and_no_guess():
    r = np.array([
        [1.0, nan, 3.0, 3.0],  # ties -> lowest index
        [nan, nan, nan, nan],  # nothing scored -> -1, never 0
        [nan, -inf, nan, -inf],  # -inf is a score: the first scored one
        [nan, 2.0, inf, nan],  # +inf wins
        [-5.0, nan, nan, nan],
    ])
    assert best_assignments(r).tolist() == [2, NO_ASSIGNMENT, 1, 2, 0]
    assert NO_ASSIGNMENT == -1 and best_assignments(r).dtype == np.int64
    # any leading shape; agrees with numpy's nanargmax where a row has a finite score
    x = np.random.default_rng(0).normal(size=(3, 5, 7))
    x[x > 1.0] = nan
    want = np.where(np.isnan(x).all(-1), -1, np.nanargmax(np.where(np.isnan(x).all(-1, keepdims=True), 0, x), -1))
    assert np.array_equal(best_assignments(x), want)
    with pytest.raises(ValueError, match="non-empty"):
        best_assignments(np.zeros((2, 0)))


def test_search_and_route_share_it():
    """search.best_assignments is the shared function; a labels store recomputed at other weights uses it too."""
    assert search.best_assignments is best_assignments
    assert not hasattr(route, "nanargmax_rows")
    space = AssignmentSpace((1, 2), 2)  # 4 assignments
    metric = np.array([[0.1, nan, 0.3, nan], [nan, nan, nan, nan]], dtype=np.float32)
    labels = route.Labels(space=space, keys=["a", "b"], sources=["a", "b"], clip_starts=np.zeros(2, np.int64),
                          best=np.array([0, 0]), metric=metric, metric_name="psnr", higher_is_better=True, mean=0.2,
                          std=0.1, w_q=1.0, w_l=0.0, clip={})
    assert labels.best_assignments(2.0, 0.0).tolist() == [2, NO_ASSIGNMENT]  # was [2, 0] (a silent guess)


def test_search_refuses_a_clip_with_nothing_scored(footage, tmp_path, monkeypatch):
    """The search cannot write a label without an assignment: one line naming the clip."""
    torch.manual_seed(0)
    proxy = EVATokTokenizer(tokenizer_config("tiny")).save_pretrained(tmp_path / "tiny", preset="tiny")
    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"metric": "psnr", "mean": 11.0, "std": 1.0, "count": 8, "seed": 0,
                                 "proxy_sha256": None}))
    real = search.exact_search

    def unscored(model, video, metric, **kw):
        res = real(model, video, metric, **kw)
        res.metric[:] = float("nan")
        return res

    monkeypatch.setattr(search, "exact_search", unscored)
    with pytest.raises(ValueError, match=r"^clip \S*carphone\S*: no scored assignment \(every reward is NaN\)$"):
        search.search_dataset(proxy, [str(footage["carphone"])], tmp_path / "s.zarr", stats=stats, clips="first",
                              workers=0, device="cpu")
