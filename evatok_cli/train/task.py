"""What every stage's task shares: one model + EMA + optimiser, saved as a model directory.

A stage's task subclasses :class:`ModelTask`, sets ``kind`` (the checkpoint model kind), builds
``model``, ``opt`` and ``ema`` in ``__post_init__`` and writes ``train_step``; saving, loading and
the resumable state come from here. Stages with more state (the tokenizer's discriminators) extend
``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from evatok_cli.checkpoint import load_model, save_model


class ModelTask:
    """Mixin for dataclass tasks with ``model``, ``opt``, ``ema``, ``env``, ``preset``, ``extra_meta``."""

    kind: ClassVar[str]

    def model_meta(self) -> dict[str, Any]:
        """Extra fields recorded in the model directory's config.json."""
        return dict(self.extra_meta)  # type: ignore[attr-defined]

    def save_model(self, path: Path) -> None:
        m = self.model  # type: ignore[attr-defined]
        save_model(
            path,
            m,
            m.config,
            kind=self.kind,
            preset=self.preset,  # type: ignore[attr-defined]
            ema=self.ema.weights_for(m),
            extra=self.model_meta(),
        )  # type: ignore[attr-defined]

    def load_model(self, path: Path) -> None:
        loaded = load_model(path, kind=self.kind, ema=False, map_location=self.env.device)  # type: ignore[attr-defined]
        self.model.load_state_dict(loaded.state_dict())  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "ema": self.ema.state_dict()}  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])  # type: ignore[attr-defined]
        self.ema.load_state_dict(state["ema"])  # type: ignore[attr-defined]
