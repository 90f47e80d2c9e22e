"""Where a job runs: the device, the process group and the collectives every job shares.

The same command runs as one process or under ``torchrun --nproc_per_node N``: NCCL on CUDA, gloo
on CPU. :func:`process_group` is the one way a job sets up and tears down distribution: it reads
the torchrun environment, initialises the process group when the job is distributed and nobody
has yet, and destroys on exit only a group it made itself (a caller's group is left alone).
Nothing else in the library looks at RANK / WORLD_SIZE / LOCAL_RANK.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device: str = "auto") -> DistEnv:
    """Read RANK/WORLD_SIZE/LOCAL_RANK (set by torchrun); init the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
        log.debug("rank %d/%d initialised (%s)", rank, world, backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown(env: DistEnv) -> None:
    """Destroy the process group (for callers that made it with :func:`init_distributed`)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto") -> Iterator[DistEnv]:
    """``with process_group(device) as env:`` a job's distribution, owning only what it made.

    Initialises the process group when the job runs under torchrun and no group exists yet, and
    destroys it on exit only in that case: a job called from code that made its own group (a
    training script, a test) leaves that group alone.
    """
    owns = not (dist.is_available() and dist.is_initialized())
    env = init_distributed(device)
    try:
        yield env
    finally:
        if owns:
            shutdown(env)


# ------------------------------------------------------------------------------ collectives
def all_reduce_mean(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalar metrics over ranks (for logging)."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    t /= env.world_size
    return dict(zip(keys, t.tolist()))


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's picklable ``obj`` on every rank (``obj`` itself in one process)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any, env: DistEnv) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    parts: list = [None] * env.world_size
    dist.all_gather_object(parts, obj)
    return parts


def gather_objects_to_main(obj: Any, env: DistEnv) -> list:
    """Every rank's picklable ``obj`` in rank order on rank 0; other ranks get []."""
    if not env.distributed:
        return [obj]
    parts: list | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, parts, dst=0)
    return parts or []
