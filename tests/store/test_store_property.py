"""A property test of the store writer and reader: random sample lengths, random kill points (an
abandoned writer whose lock is left to a dead pid), random append sequences. Every committed sample
reads back bit-exact, no key appears twice, and a final clean run holds exactly every input."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_job import EXTRA, make_attrs, make_sample

from evatok_cli.store import open_store, open_writer
from evatok_cli.store.lock import LOCK_NAME

_DEAD = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
DEAD_PID = int(_DEAD.stdout)

RUN = st.tuples(
    st.lists(st.integers(0, 40), max_size=12),  # the run's inputs (sample ids; lengths vary with the id)
    st.one_of(st.none(), st.integers(0, 12)),  # killed after this many appends (None: finishes)
    st.booleans(),  # flush just before the kill
)


def check_committed(path: Path, allowed: set[int], fmt: str) -> set[str]:
    r = open_store(path, allow_unfinished=True)
    assert len(set(r.keys)) == len(r.keys), "a key appears twice"
    ids = {int(k[4:9]) for k in r.keys}
    assert ids <= allowed
    for s in r:
        want = make_sample(int(s.key[4:9]))
        assert s.key == want.key and np.array_equal(s.tokens, want.tokens)
        assert tuple(int(x) for x in s.block_lengths) == tuple(want.block_lengths)
        assert (s.assignment, s.source, s.clip_start, s.label) == (
            want.assignment,
            want.source,
            want.clip_start,
            want.label,
        )
        assert s.extra["metric"].tobytes() == want.extra["metric"].tobytes()
    return set(r.keys)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=st.lists(RUN, min_size=1, max_size=5), fmt=st.sampled_from(["zarr", "wds"]), commit=st.integers(1, 5))
def test_random_kills_and_appends(runs, fmt, commit):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s"
        asked: set[int] = set()
        for ids, kill_after, flush in runs:
            asked |= set(ids)
            w = open_writer(
                path,
                format=fmt,
                attrs=make_attrs(),
                num_blocks=4,
                extra_fields=EXTRA,
                commit_every=commit,
                samples_per_shard=commit,
                commit_seconds=None,
            )
            todo = [make_sample(i) for i in dict.fromkeys(ids)]
            todo = [s for s in todo if s.key not in w.done_keys]
            if w.finished and todo:
                w.start_append()
            killed = False
            for k, s in enumerate(todo):
                if kill_after == k:
                    killed = True
                    break
                w.append([s])
            if killed or (kill_after is not None and kill_after == len(todo) and not w.finished):
                if flush:
                    w.flush()
                # a kill -9: the writer vanishes, its lock file stays behind with a dead pid
                w.lock.release()
                path.mkdir(exist_ok=True)
                (path / LOCK_NAME).write_text(
                    json.dumps({"pid": DEAD_PID, "host": socket.gethostname(), "job": "dead"})
                )
                check_committed(path, asked, fmt)
            else:
                w.close()
                keys = check_committed(path, asked, fmt)
                assert {s.key for s in todo} <= keys == set(open_store(path).keys)  # finished, with this run's inputs
        # a clean rerun with every input ever asked for: exactly those, each once, bit-exact
        with open_writer(path, format=fmt, attrs=make_attrs(), num_blocks=4, extra_fields=EXTRA) as w:
            todo = [make_sample(i) for i in sorted(asked) if make_sample(i).key not in w.done_keys]
            if w.finished and todo:
                w.start_append()
            if todo:
                w.append(todo)
        assert not (path / LOCK_NAME).exists()
        keys = check_committed(path, asked, fmt)
        assert keys == {make_sample(i).key for i in asked}
        assert len(open_store(path)) == len(asked)
