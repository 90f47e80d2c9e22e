"""One writer per store: a second process is refused at once; stale locks of dead processes are taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from store_job import EXTRA, make_attrs, make_sample

from evatok_cli.store import StoreError, open_store, open_writer
from evatok_cli.store.lock import LOCK_NAME, StoreLockedError, acquire, read_lock

FORMATS = ["zarr", "wds"]

HOLD = """
import sys, time
sys.path.insert(0, {tests!r})
from store_job import EXTRA, make_attrs, make_sample
from evatok_cli.store import open_writer
w = open_writer({out!r}, format={fmt!r}, attrs=make_attrs(), num_blocks=4, extra_fields=EXTRA, commit_every=2,
                samples_per_shard=2)
w.append([make_sample(i) for i in range(4)])
w.flush()
print("holding", flush=True)
time.sleep(60)
"""


def hold(out: Path, fmt: str) -> subprocess.Popen:
    code = HOLD.format(tests=str(Path(__file__).parent), out=str(out), fmt=fmt)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "holding"
    return p


def files(path: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(path)): (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.rglob("*"))}


def dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


@pytest.mark.parametrize("fmt", FORMATS)
def test_second_process_is_refused_then_kill_9_is_taken_over(tmp_path, fmt):
    out = tmp_path / "s"
    p = hold(out, fmt)
    try:
        before = files(out)
        rec = read_lock(out)
        assert rec is not None and rec["pid"] == p.pid and rec["host"] == socket.gethostname()
        with pytest.raises(StoreLockedError) as e:
            open_writer(out, format=fmt, attrs=make_attrs(), num_blocks=4, extra_fields=EXTRA)
        msg = str(e.value)
        assert "\n" not in msg and str(out) in msg and f"pid {p.pid}" in msg and socket.gethostname() in msg
        assert files(out) == before  # touched nothing
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert read_lock(out)["pid"] == p.pid  # left behind by the killed process...
    with open_writer(out, format=fmt, attrs=make_attrs(), num_blocks=4, extra_fields=EXTRA) as w:  # ...taken over
        assert len(w.done_keys) == 4
        w.append([make_sample(i) for i in range(4, 6)])
    assert not (out / LOCK_NAME).exists()
    assert sorted(open_store(out).keys) == sorted(make_sample(i).key for i in range(6))


def test_stale_and_foreign_locks(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "job": "x"}))
    lock = acquire(out)  # a dead pid on this host: stale, taken over
    assert read_lock(out)["pid"] == os.getpid()
    lock.release()
    assert not (out / LOCK_NAME).exists()
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "job": "y", "command": "evatok encode"}))
    with pytest.raises(StoreLockedError, match=r"pid 1 on host elsewhere.*delete .*\.evatok\.lock"):
        acquire(out)
    (out / LOCK_NAME).unlink()
    a, b = acquire(out), acquire(out)  # writers of one process share the lock (e.g. ranks in a test)
    a.release()
    assert (out / LOCK_NAME).exists()
    b.release()
    assert not (out / LOCK_NAME).exists()


def test_lock_on_a_file_path_is_an_error(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        acquire(f)
