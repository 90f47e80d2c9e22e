"""Packaging: every sub-package is installed, kernels install as evatok_kernels, the version agrees."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import evatok_cli

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "evatok_cli").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert found <= listed, f"add to pyproject [tool.setuptools] packages: {sorted(found - listed)}"
    assert "evatok_kernels" in listed


def test_kernels_import_under_noncolliding_name():
    import evatok_kernels

    assert isinstance(evatok_kernels.triton_available(), bool)


def test_version_from_console_script():
    out = subprocess.run([sys.executable, "-m", "evatok_cli", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"evatok {evatok_cli.__version__}"
