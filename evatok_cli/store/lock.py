"""One writer per store: the lock file ``.evatok.lock`` inside a store being written (DESIGN §4).

The lock is a small JSON file ``{pid, host, started, command, job, pid_start}`` created atomically
(written under a temporary name, then ``os.link``-ed to ``.evatok.lock``: the link fails when the
file exists, so exactly one process wins and the file is never seen half-written). Rules:

- a second writer of the same store is refused at once with :class:`StoreLockedError` (one line
  naming the store and the holder's pid, host and command) before it changes anything;
- the ranks of one torchrun job share the lock: ``job`` names the job (its rendezvous id and
  master address), and ``pid`` is the torchrun agent's, which outlives every rank; only rank 0
  removes the file, after the store's index is written;
- writers in one process share it too (they are one program; e.g. tests opening several ranks);
- a lock whose process is gone (same host, pid dead, a zombie, or reused by a later process) is
  stale and is taken over; the takeover runs under ``fcntl.flock`` on ``.evatok.lock.guard`` so
  two resuming processes cannot both take it. A lock held on another host cannot be checked:
  remove the file by hand once that job is gone (the error says so).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from evatok_cli.store.common import StoreError

LOCK_NAME = ".evatok.lock"
GUARD_NAME = ".evatok.lock.guard"
LOCK_FILES = (LOCK_NAME, GUARD_NAME)
"""Files of the lock inside a store directory (not part of the store's data)."""

_held: dict[str, int] = {}  # lock path -> writers of this process holding it


class StoreLockedError(StoreError):
    """Another process (another job) is writing the store."""


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def _proc_state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[0]


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` runs on this host (not a zombie; the same process when ``start`` is given)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError as e:  # pragma: no cover - unusual platforms
        return e.errno != errno.ESRCH
    if _proc_state(pid) == "Z":
        return False
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False
    return True


def holder_identity() -> dict[str, Any]:
    """Who this process writes for: the job, and the pid whose life bounds the job's."""
    host = socket.gethostname()
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun: ranks share the lock; the agent (our parent) lives as long as any rank.
        pid = os.getppid()
        job = f"torchrun:{run_id}@{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
    else:
        pid = os.getpid()
        job = f"process:{host}:{pid}:{_proc_start(pid)}"
    return {
        "pid": pid,
        "host": host,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python",
        "job": job,
        "pid_start": _proc_start(pid),
    }


def read_lock(path: str | Path) -> dict[str, Any] | None:
    """The lock record of the store at ``path``, or None when it is not locked."""
    try:
        obj = json.loads((Path(path) / LOCK_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": -1, "host": "?", "command": "?", "job": "?", "unreadable": True}
    return obj if isinstance(obj, dict) else {"pid": -1, "host": "?", "command": "?", "job": "?"}


def is_stale(rec: dict[str, Any]) -> bool:
    """A lock of a process on this host that is gone (or an unreadable lock file)."""
    if rec.get("unreadable"):
        return True
    if rec.get("host") != socket.gethostname():
        return False
    return not pid_alive(int(rec.get("pid", -1)), rec.get("pid_start"))


def describe(path: Path, rec: dict[str, Any]) -> str:
    msg = (
        f"{path} is being written by another process (pid {rec.get('pid')} on host {rec.get('host')}, "
        f"since {rec.get('started', '?')}: {rec.get('command', '?')}); wait for it to finish or use another output"
    )
    if rec.get("host") != socket.gethostname():
        msg += f" (if that job is gone, delete {path / LOCK_NAME})"
    return msg


class StoreLock:
    """This process's hold on the lock of one store; see :func:`acquire`."""

    def __init__(self, path: Path, record: dict[str, Any], remover: bool, created_dir: bool = False) -> None:
        self.path = path
        self.record = record
        self.remover = remover  # removes the file on release (rank 0, or a single process)
        self.created_dir = created_dir  # acquire() made the directory: removed again if left empty
        self._released = False

    def release(self) -> None:
        """Drop this hold; the last hold of the process that removes the lock deletes the file."""
        if self._released:
            return
        self._released = True
        key = str(self.path / LOCK_NAME)
        _held[key] = _held.get(key, 1) - 1
        if _held[key] > 0:
            return
        del _held[key]
        if not self.remover:
            return
        cur = read_lock(self.path)
        if cur is not None and cur.get("job") == self.record["job"]:
            try:
                (self.path / LOCK_NAME).unlink()
            except FileNotFoundError:
                pass
        if self.created_dir:
            try:
                self.path.rmdir()  # only when nothing was written (a job that failed before writing)
            except OSError:
                pass

    def __enter__(self) -> StoreLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextmanager
def _guard(path: Path):
    fd = os.open(path / GUARD_NAME, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def acquire(path: str | Path, *, rank: int = 0) -> StoreLock:
    """Lock the store directory ``path`` (created when missing) for this process or job.

    Args:
        path: the store directory.
        rank: this writer's rank; in a multi-process job only rank 0 removes the lock on release.

    Returns:
        A :class:`StoreLock`; call ``release()`` (or use it as a context manager) when done.

    Raises:
        StoreLockedError: another live process or job holds the lock (nothing was changed).
        StoreError: ``path`` exists and is not a directory.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise StoreError(f"{path} exists and is not a directory")
    created_dir = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    me = holder_identity()
    lock = path / LOCK_NAME
    tmp = path / f"{LOCK_NAME}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    for _ in range(100):
        tmp.write_text(json.dumps(me))
        try:
            os.link(tmp, lock)
            created = True
        except FileExistsError:
            created = False
        finally:
            tmp.unlink(missing_ok=True)
        if created:
            break
        rec = read_lock(path)
        if rec is None:
            continue  # released or taken over meanwhile: try again
        if rec.get("job") == me["job"]:
            me = rec  # the same job (another rank, or another writer of this process)
            break
        if not is_stale(rec):
            raise StoreLockedError(describe(path, rec))
        with _guard(path):
            if read_lock(path) == rec:  # still the stale one: nobody took it over meanwhile
                lock.unlink(missing_ok=True)
    else:  # pragma: no cover - only under pathological contention
        raise StoreLockedError(f"{path}: could not take the store lock (it keeps changing hands)")
    key = str(lock)
    _held[key] = _held.get(key, 0) + 1
    remover = rank == 0
    return StoreLock(path, me, remover, created_dir)
