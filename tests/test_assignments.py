"""AssignmentSpace: the mixed-radix contract of DESIGN §3 and the exact length statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evatok_cli.assignments import PAPER_SPACE, AssignmentSpace


def test_paper_space_size_and_order():
    s = PAPER_SPACE
    assert len(s) == 625
    assert s.to_tuple(0) == (32, 32, 32, 32)
    assert s.to_tuple(624) == (512, 512, 512, 512)
    # first block most significant
    assert s.to_tuple(1) == (32, 32, 32, 64)
    assert s.to_tuple(125) == (64, 32, 32, 32)
    assert s.to_index((64, 32, 32, 32)) == 125


def test_round_trip_and_iteration_order():
    s = AssignmentSpace(levels=(1, 3, 7), blocks=3)
    for i, a in enumerate(s):
        assert s.to_tuple(i) == a
        assert s.to_index(a) == i
    assert [tuple(r) for r in s.table()] == list(itertools.product((1, 3, 7), repeat=3))


def test_exact_length_stats_match_enumeration():
    for s in (
        PAPER_SPACE,
        AssignmentSpace(levels=(8, 16, 32, 64, 128), blocks=4),
        AssignmentSpace(levels=(2, 5), blocks=3),
    ):
        lengths = s.lengths().astype(np.float64)
        assert s.length_mean == pytest.approx(lengths.mean())
        assert s.length_std == pytest.approx(lengths.std())
    # PAPER.md §3: mean 793.6, std ~349.1
    assert PAPER_SPACE.length_mean == pytest.approx(793.6)
    assert PAPER_SPACE.length_std == pytest.approx(349.1, abs=0.05)
    z = PAPER_SPACE.lengths_z()
    assert z.mean() == pytest.approx(0, abs=1e-12) and z.std() == pytest.approx(1)
    assert PAPER_SPACE.length_z((512,) * 4) == pytest.approx(z[-1])


def test_validation_errors():
    with pytest.raises(ValueError, match="strictly increasing"):
        AssignmentSpace(levels=(64, 32), blocks=4)
    with pytest.raises(ValueError, match="positive"):
        AssignmentSpace(levels=(0, 32), blocks=4)
    with pytest.raises(ValueError, match="not a level"):
        PAPER_SPACE.to_index((32, 32, 32, 33))
    with pytest.raises(ValueError, match="blocks"):
        PAPER_SPACE.to_index((32, 32))
    with pytest.raises(IndexError):
        PAPER_SPACE.to_tuple(625)


def test_parse_and_sample():
    s = PAPER_SPACE
    assert s.parse("uniform:256") == (256,) * 4
    assert s.parse("fixed:512,128,64,32") == (512, 128, 64, 32)
    with pytest.raises(ValueError):
        s.parse("fixed:1,2,3,4")
    a = s.sample(np.random.default_rng(0), n=4000)
    assert a.shape == (4000, 4) and set(np.unique(a)) == set(s.levels)
    assert (a == s.sample(np.random.default_rng(0), n=4000)).all()
    assert AssignmentSpace.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown"):
        AssignmentSpace.from_dict({"levels": [1], "blocks": 1, "extra": 1})
