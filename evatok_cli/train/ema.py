"""Exponential moving average of model weights (kept in float32 beside the model)."""

from __future__ import annotations

import torch


def ema_decay_at(step: int, decay: float) -> float:
    """Decay used at ``step``: ramps up as (1 + step) / (10 + step), capped at ``decay``.

    Early weights move fast, so a plain 0.999 EMA of a short run would still be mostly the random
    initialisation (0.999^300 = 0.74); the ramp makes the EMA usable from the first few hundred
    steps, and as a function of the step it keeps resume exact.
    """
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """``ema = d * ema + (1 - d) * param`` after every optimizer step, d = :func:`ema_decay_at`;
    buffers are copied."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int | None = None) -> None:
        """Fold the model's weights in; ``step`` (0-based) enables the warm-up ramp."""
        d = self.decay if step is None else ema_decay_at(step, self.decay)
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.mul_(d).add_(v.detach().float(), alpha=1.0 - d)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state is missing {sorted(missing)[:3]}")
        self.shadow = {k: state[k].detach().clone().float().to(self.shadow[k].device) for k in self.shadow}

    def weights_for(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The EMA weights cast to the model's dtypes (for saving as ``ema.safetensors``)."""
        ref = model.state_dict()
        return {k: v.to(ref[k].dtype) for k, v in self.shadow.items()}
