"""Tensor collectives only where the tensor's device is chosen from the process group.

NCCL rejects CPU tensors: a bare ``dist.all_reduce(torch.tensor(...))`` passes every CPU test and
fails at the very end of a multi-GPU job, after all the work. So tensor collectives live in the
helpers of ``runtime.py`` (which put the tensor on the job's device) and in
``metrics/fvd.py`` (which picks the device from the group's backend); every other module uses those
helpers or the object collectives. This test reads the sources, so the CPU suite catches the
whole class of bug.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evatok_cli.runtime import DistEnv, all_reduce_mean

PACKAGE = Path(__file__).resolve().parents[2] / "evatok_cli"
CHECKED = PACKAGE.parent / "tests" / "checked_evatok.py"


def _checked():
    spec = importlib.util.spec_from_file_location("checked_evatok", CHECKED)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# one list of tensor collectives and of the device-aware helpers: the torchrun guard's
GUARD = _checked()
TENSOR_COLLECTIVES = set(GUARD.TENSOR_COLLECTIVES)
ALLOWED = {p.removeprefix("evatok_cli/") for p in GUARD.DEVICE_AWARE}


def _tensor_collective_calls(path: Path, root: Path = PACKAGE) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in TENSOR_COLLECTIVES:
            base = node.func.value
            if isinstance(base, ast.Name) and base.id in {"dist", "c10d"}:
                found.append(f"{path.relative_to(root)}:{node.lineno} dist.{node.func.attr}")
    return found


def test_tensor_collectives_only_in_device_aware_helpers():
    offenders = [
        hit
        for p in sorted(PACKAGE.rglob("*.py"))
        if str(p.relative_to(PACKAGE)) not in ALLOWED
        for hit in _tensor_collective_calls(p)
    ]
    assert not offenders, f"use runtime.py's helpers (tensor on env.device) instead: {offenders}"


def test_the_scan_finds_a_bare_collective(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\nimport torch\ndist.all_reduce(torch.zeros(1))\n")
    assert _tensor_collective_calls(bad, tmp_path) == ["bad.py:3 dist.all_reduce"]


class _Stop(Exception):
    pass


def test_all_reduce_mean_puts_its_tensor_on_the_job_device(monkeypatch):
    seen = []

    def fake_all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        raise _Stop  # a meta tensor holds no values: only its placement is checked

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    with pytest.raises(_Stop):
        all_reduce_mean({"a": 1.0, "b": 2.0}, DistEnv(rank=0, world_size=2, device=torch.device("meta")))
    assert seen == [torch.device("meta")]


# ------------------------------------------- the torchrun tests' guard (tests/checked_evatok.py)
def test_the_guard_rejects_a_tensor_off_the_job_device():
    checked = GUARD
    cuda = torch.device("cuda", 0)  # a device object needs no GPU
    with pytest.raises(checked.OffDeviceCollective, match="tensor on cpu, the job runs on cuda:0"):
        checked.check("all_reduce", (torch.zeros(2),), {}, cuda, "evatok_cli/runtime.py:1")
    with pytest.raises(checked.OffDeviceCollective, match="tensor on cpu"):
        checked.check("all_gather", ([torch.zeros(1)], torch.zeros(1)), {}, cuda, "evatok_cli/runtime.py:1")
    checked.check("barrier", (), {}, cuda, "evatok_cli/encode.py:1")  # no tensor: nothing to check
    cpu = torch.device("cpu")
    checked.check("all_reduce", (torch.zeros(2),), {}, cpu, "/x/evatok_cli/runtime.py:120")
    with pytest.raises(checked.OffDeviceCollective, match="outside the device-aware helpers"):
        checked.check("all_reduce", (torch.zeros(2),), {}, cpu, "/x/evatok_cli/encode.py:88")


BAD_JOB = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {tests!r})
from checked_evatok import install
from evatok_cli.runtime import DistEnv, all_reduce_mean

dist.init_process_group("gloo")
env = DistEnv(rank=dist.get_rank(), world_size=2, device=torch.device("cpu"))
install(env.device)
print(f"rank{{env.rank}} mean {{all_reduce_mean({{'x': float(env.rank)}}, env)['x']}}", flush=True)
t = torch.tensor([1.0])  # what encode's old _reduce did: fine on gloo, rejected by NCCL
dist.all_reduce(t)
print("not caught", flush=True)
"""


@pytest.mark.slow
def test_torchrun_guard_catches_a_bare_collective(tmp_path):
    """Under torchrun the guard lets runtime's helper through and stops a bare all_reduce."""
    job = tmp_path / "bad_job.py"
    job.write_text(BAD_JOB.format(tests=str(CHECKED.parent)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    res = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(port), str(job)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert res.returncode != 0
    # each rank prints its own line (the two processes' writes may interleave, the substrings survive)
    assert "rank0 mean 0.5" in res.stdout and "rank1 mean 0.5" in res.stdout and "not caught" not in res.stdout
    assert "OffDeviceCollective" in res.stderr and "bad_job.py:14" in res.stderr
