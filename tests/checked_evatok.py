"""``evatok`` under torchrun in a gloo process group whose tensor collectives NCCL would accept.

    torchrun --nproc_per_node 2 tests/checked_evatok.py search --tokenizer ... --device cpu

The torchrun tests of every distributed job (encode, search, route, eval recon / gen, train
tokenizer / router / gpt) start the CLI through this file instead of ``-m evatok_cli``. It makes
the process group itself (gloo; the job's ``runtime.process_group`` finds it and leaves it alone)
and wraps the tensor collectives of ``torch.distributed``; a call that NCCL would reject raises:

* a tensor that is not on the job's device (``--device``, resolved as the job resolves it);
* on a CPU job, where every tensor is on the job's device, a tensor collective made anywhere but
  the device-aware helpers (``runtime.py``, ``train/dist.py``, ``metrics/fvd.py``): those place
  the tensor from the job's device (tests/train/test_collectives.py checks them with a device
  that is not the CPU), while a bare ``dist.all_reduce(torch.tensor(...))`` elsewhere passes on
  gloo and fails on NCCL after all the work.

The object collectives (``broadcast_object_list`` ...) are left to torch, which puts their
buffers on the backend's device.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

TENSOR_COLLECTIVES = (
    "all_reduce",
    "reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "gather",
    "scatter",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
)
DEVICE_AWARE = ("evatok_cli/runtime.py", "evatok_cli/train/dist.py", "evatok_cli/metrics/fvd.py")


class OffDeviceCollective(RuntimeError):
    """A tensor collective that NCCL would reject."""


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for x in obj for t in _tensors(x)]
    return []


def caller(stack: list[traceback.FrameSummary]) -> str:
    """``path:line`` of the innermost frame outside torch and this file (who made the call)."""
    for frame in reversed(stack):
        f = frame.filename.replace(os.sep, "/")
        if "/torch/" not in f and not f.endswith("checked_evatok.py"):
            return f"{f}:{frame.lineno}"
    return "?"


def check(name: str, args: tuple, kwargs: dict, job_device: torch.device, site: str) -> None:
    """Raise :class:`OffDeviceCollective` when NCCL would reject this call (see the module doc)."""
    tensors = _tensors(list(args) + list(kwargs.values()))
    for t in tensors:
        if t.device != job_device:
            raise OffDeviceCollective(
                f"dist.{name} at {site}: tensor on {t.device}, the job runs on {job_device} (NCCL rejects it)"
            )
    if tensors and job_device.type == "cpu" and not any(s in site for s in DEVICE_AWARE):
        raise OffDeviceCollective(
            f"dist.{name} at {site}: a tensor collective outside the device-aware helpers "
            f"({', '.join(DEVICE_AWARE)}); on a GPU job its tensor must be on the job's device"
        )


def install(job_device: torch.device, log: list | None = None) -> None:
    """Wrap ``torch.distributed``'s tensor collectives with :func:`check` (and record them in ``log``)."""
    for name in TENSOR_COLLECTIVES:
        original = getattr(dist, name)

        @functools.wraps(original)
        def wrapped(*args, __name=name, __original=original, **kwargs):
            site = caller(traceback.extract_stack()[:-1])
            check(__name, args, kwargs, job_device, site)
            if log is not None:
                log.append((__name, site))
            return __original(*args, **kwargs)

        setattr(dist, name, wrapped)


def _job_device(argv: list[str]) -> torch.device:
    from evatok_cli.runtime import resolve_device

    device = "auto"
    for i, a in enumerate(argv):
        if a == "--device" and i + 1 < len(argv):
            device = argv[i + 1]
        elif a.startswith("--device="):
            device = a.split("=", 1)[1]
    return resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))


def main(argv: list[str]) -> int:
    from evatok_cli.cli import main as evatok

    device = _job_device(argv)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log: list = []
    install(device, log)
    try:
        sys.argv = ["evatok", *argv]
        try:
            evatok()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if os.environ.get("EVATOK_COLLECTIVE_LOG"):
            path = Path(os.environ["EVATOK_COLLECTIVE_LOG"]) / f"rank{dist.get_rank()}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(f"{n}\t{s}\n" for n, s in log))
        return code
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
