"""evatok: adaptive-length video tokenization (EVATok, arXiv 2603.12267) for AR video generation.

The library behind the ``evatok`` command. Heavy submodules (torch models, stores) are imported
lazily so that ``evatok --version`` and ``import evatok_cli`` stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "AssignmentSpace": "evatok_cli.assignments",
    "encode_videos": "evatok_cli.encode",
    "decode_store": "evatok_cli.decode",
    "open_store": "evatok_cli.store",
    "open_writer": "evatok_cli.store",
    "EVATokTokenizer": "evatok_cli.models.tokenizer",
    "train_tokenizer": "evatok_cli.train.tokenizer",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'evatok_cli' has no attribute {name!r}")
