"""The README's first command, run as written (minus the installs) in a fresh directory.

It is the main job on the shipped demo models: build a few clips with examples/demo_corpus.py,
`evatok encode` them without `--tokenizer`/`--router`, then `evatok info` the store. The test runs
every step after the `pip install`s as one real shell command, so a README that drifts from the
CLI, or demo models that stop loading, fail here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import zarr

ROOT = Path(__file__).resolve().parents[1]


def first_command() -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no ```bash block"
    lines = [ln.split("#", 1)[0].strip() for ln in block.group(1).splitlines()]
    return " ".join(ln.rstrip("\\").strip() for ln in lines if ln)


def test_first_command_installs_then_encodes_with_the_shipped_models(tmp_path):
    steps = [s.strip() for s in first_command().split("&&")]
    installs = [s for s in steps if s.startswith("pip install")]
    assert any("torch==2.13.0" in s for s in installs) and any("scikit-video" in s for s in installs), steps
    assert steps[-1].startswith("evatok info"), "the first command ends by printing the store summary"
    rest = " && ".join(s for s in steps if not s.startswith("pip install"))
    # run from a copy-free checkout: the examples are referenced relative to the repository root
    rest = rest.replace("examples/", f"{ROOT}/examples/")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("EVATOK_DEMO_MODELS", None)  # the models inside the package, as a new user gets them
    proc = subprocess.run(
        ["bash", "-c", f"set -e; {rest}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using the shipped demo tokenizer and router" in proc.stderr
    store = next(tmp_path.glob("*.zarr"))
    # the store is readable with plain zarr: ragged tokens + offsets, one row per clip
    part = zarr.open_group(str(store / "part-00000"), mode="r")
    offsets = part["offsets"][:]
    assert len(offsets) == len(part["key"][:]) + 1 > 1
    assert offsets[-1] == part["tokens"].shape[0]
    lengths = part["block_lengths"][:].sum(1)
    assert (lengths == offsets[1:] - offsets[:-1]).all()
    assert len(set(lengths.tolist())) > 1, "the demo router gives clips different lengths"
    assert "tokens" in proc.stdout and str(len(lengths)) in proc.stdout
