"""Distribution, injected: read the torchrun environment, init the process group, wrap DDP.

The same command runs as one process or under ``torchrun --nproc_per_node N``: NCCL on CUDA, gloo
on CPU. Nothing else in the training code looks at environment variables.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

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
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: torch.nn.Module, env: DistEnv, **kwargs) -> torch.nn.Module:
    """DDP-wrap ``model`` when the job is distributed; otherwise return it unchanged."""
    if not env.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model


def all_reduce_mean(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Average scalar metrics over ranks (for logging)."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    t /= env.world_size
    return dict(zip(keys, t.tolist()))


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum numbers over ranks; the tensor lives on the job's device (NCCL rejects CPU tensors)."""
    if not env.distributed:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's picklable ``obj`` on every rank (``obj`` itself in one process)."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj, env: DistEnv) -> list:
    """Every rank's picklable ``obj``, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    parts: list = [None] * env.world_size
    dist.all_gather_object(parts, obj)
    return parts


def gather_objects_to_main(obj, env: DistEnv) -> list:
    """Every rank's picklable ``obj`` in rank order on rank 0; other ranks get []."""
    if not env.distributed:
        return [obj]
    parts: list | None = [None] * env.world_size if env.is_main else None
    dist.gather_object(obj, parts, dst=0)
    return parts or []
