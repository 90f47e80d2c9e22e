"""More inputs into a finished store append as new parts (DESIGN §4); killed appends resume."""

from __future__ import annotations

import numpy as np
import pytest
from store_job import EXTRA, make_attrs, make_sample

from evatok_cli.store import StoreError, is_store, open_store, open_writer

FORMATS = ["zarr", "wds"]


def opener(path, fmt, **kw):
    kw = dict(commit_every=4, samples_per_shard=4, **kw)
    return open_writer(path, format=fmt, attrs=make_attrs(), num_blocks=4, extra_fields=EXTRA, **kw)


def write(path, fmt, ids, **kw) -> None:
    with opener(path, fmt, **kw) as w:
        todo = [make_sample(i) for i in ids]
        todo = [s for s in todo if s.key not in w.done_keys]
        if w.finished and todo:
            w.start_append()
        if todo:
            w.append(todo)


def check(path, ids) -> None:
    r = open_store(path)
    assert sorted(r.keys) == sorted(make_sample(i).key for i in ids)
    assert len(set(r.keys)) == len(r.keys)
    for s in r:
        want = make_sample(int(s.key[4:9]))
        assert np.array_equal(s.tokens, want.tokens) and s.tokens.dtype == np.uint16
        assert s.source == want.source and s.clip_start == want.clip_start


@pytest.mark.parametrize("fmt", FORMATS)
def test_append_new_parts_and_rerun_is_a_no_op(tmp_path, fmt):
    p = tmp_path / "s"
    write(p, fmt, range(10))
    write(p, fmt, range(5, 17))  # 5..9 already there, 10..16 new
    check(p, range(17))
    write(p, fmt, range(17))  # nothing new: the store is left as it is
    check(p, range(17))
    write(p, fmt, range(30, 33))
    check(p, [*range(17), 30, 31, 32])
    r = open_store(p)
    assert r.stats()["samples"] == 20


@pytest.mark.parametrize("fmt", FORMATS)
def test_killed_append_keeps_the_old_store_readable_and_resumes(tmp_path, fmt):
    p = tmp_path / "s"
    write(p, fmt, range(8))
    w = opener(p, fmt)
    w.start_append()
    w.append([make_sample(i) for i in range(8, 14)])
    w.flush()
    w.lock.release()  # a kill: nothing closed, the lock stays with this (live) process only
    assert is_store(p) and len(open_store(p)) == 8  # readers see the store as it was
    assert len(open_store(p, allow_unfinished=True)) == 14
    w2 = opener(p, fmt)  # resumes the append: old keys and the committed new ones are done
    assert not w2.finished and {make_sample(i).key for i in range(14)} <= w2.done_keys
    with pytest.raises(StoreError, match="committed by an earlier run"):
        w2.append([make_sample(3)])
    w2.append([make_sample(i) for i in range(14, 20)])
    w2.close()
    check(p, range(20))


@pytest.mark.parametrize("fmt", FORMATS)
def test_append_with_other_settings_is_refused_with_the_reason(tmp_path, fmt):
    p = tmp_path / "s"
    write(p, fmt, range(4))
    with pytest.raises(StoreError, match="different attrs"):
        open_writer(p, format=fmt, attrs=make_attrs(seed=1), num_blocks=4, extra_fields=EXTRA)
    check(p, range(4))
