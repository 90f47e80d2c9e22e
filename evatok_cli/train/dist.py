"""Distribution for training: DDP wrapping on top of :mod:`evatok_cli.runtime`.

The process group, the device and the object collectives live in :mod:`evatok_cli.runtime` (every
job shares them); they are re-exported here for the training code and its callers.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from evatok_cli.runtime import (
    DistEnv,
    all_gather_objects,
    all_reduce_mean,
    broadcast_object,
    gather_objects_to_main,
    init_distributed,
    process_group,
    resolve_device,
    shutdown,
)

__all__ = [
    "DistEnv",
    "all_gather_objects",
    "all_reduce_mean",
    "broadcast_object",
    "gather_objects_to_main",
    "init_distributed",
    "process_group",
    "resolve_device",
    "shutdown",
    "unwrap",
    "wrap_ddp",
]


def wrap_ddp(model: torch.nn.Module, env: DistEnv, **kwargs) -> torch.nn.Module:
    """DDP-wrap ``model`` when the job is distributed; otherwise return it unchanged."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **kwargs)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, torch.nn.Module) else model
