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
from pathlib import Path

import pytest
import torch

from evatok_cli.runtime import DistEnv, all_reduce_mean

PACKAGE = Path(__file__).resolve().parents[2] / "evatok_cli"
TENSOR_COLLECTIVES = {
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
}
ALLOWED = {"train/dist.py", "runtime.py", "metrics/fvd.py"}


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
