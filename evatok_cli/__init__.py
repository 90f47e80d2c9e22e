"""evatok: adaptive-length video tokenization (EVATok, arXiv 2603.12267) for AR video generation.

The library behind the ``evatok`` command. Heavy submodules (torch models, stores) are imported
lazily so that ``evatok --version`` and ``import evatok_cli`` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "AssignmentSpace"]


def __getattr__(name: str):
    if name == "AssignmentSpace":
        from evatok_cli.assignments import AssignmentSpace

        return AssignmentSpace
    raise AttributeError(f"module 'evatok_cli' has no attribute {name!r}")
