"""Packaging: every sub-package is installed, kernels install as evatok_kernels, the version agrees,
and the shipped demo models (evatok_cli/demo/models) go into wheels and sdists."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
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


def test_wheel_and_sdist_carry_the_demo_models(tmp_path):
    """Build both from a copy of the sources (never in the checkout) holding placeholder demo models."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)

    def ignore(folder: str, names: list[str]) -> set[str]:  # the checkout's own demo models stay out
        skip = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        return skip | ({"models"} if Path(folder).name == "demo" else set())

    for name in ("evatok_cli", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    models = src / "evatok_cli" / "demo" / "models"
    shipped = [f"{kind}/{f}" for kind in ("tokenizer", "router", "gpt") for f in ("config.json", "model.safetensors")]
    for rel in shipped + ["tokenizer/ema.safetensors", "gpt/train_state.pt", ".staging-x/router/config.json"]:
        (models / rel).parent.mkdir(parents=True, exist_ok=True)
        (models / rel).write_text("{}")
    dist = tmp_path / "dist"
    code = f"from setuptools import build_meta as b; b.build_wheel({str(dist)!r}); b.build_sdist({str(dist)!r})"
    res = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    prefix = "evatok_cli/demo/models/"
    in_wheel = {n.removeprefix(prefix) for n in zipfile.ZipFile(wheel).namelist() if n.startswith(prefix)}
    assert in_wheel == set(shipped)  # no EMA, training state or staging leftovers
    with tarfile.open(sdist) as t:
        in_sdist = {n.split(prefix, 1)[1] for n in t.getnames() if prefix in n and t.getmember(n).isfile()}
    assert set(shipped) <= in_sdist


def test_repository_root_never_shadows_the_pypi_kernels_package():
    """From the repository root (where `python -m pytest` runs), `import kernels` must never be our
    folder: transformers >= 5 imports Hugging Face's `kernels` package whenever it is installed."""
    code = (
        "import importlib.metadata as md, pathlib, sys\n"
        "root = pathlib.Path.cwd().resolve()\n"
        "import kernels\n"
        "files = [pathlib.Path(p).resolve() for p in ([kernels.__file__] if getattr(kernels, '__file__', None) else [])]\n"
        "assert not any(root / 'kernels' in f.parents for f in files), files  # (a venv may live in root)\n"
        "try:\n"
        "    md.version('kernels')\n"
        "except md.PackageNotFoundError:\n"
        "    print('no-pypi-kernels')\n"
        "else:\n"
        "    assert files, 'the PyPI kernels package is installed but a namespace folder won'\n"
        "    import transformers.modeling_utils  # what broke when our folder shadowed it\n"
        "    print('pypi-kernels', files[0])\n"
        "import evatok_kernels\n"
        "assert evatok_kernels.__name__ == 'evatok_kernels'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not (ROOT / "kernels" / "__init__.py").exists(), "kernels/ must not be a package: see docs/kernels.md"
