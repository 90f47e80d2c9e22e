"""A preallocated key/value cache for incremental GPT decoding (STYLE rule 9: its own small module).

One (B, n_kv_heads, max_len, head_dim) key buffer and one value buffer per layer, plus a single
position counter shared by all layers and all rows. Every row of a batch sits at the same
position: the sampler feeds one token per row per step, and rows that finished early keep being
fed (their tokens are discarded), so a shared counter is exact.

Protocol used by :class:`evatok_cli.models.gpt.GPT`: within one call (``prefill`` or
``decode_step``) each layer calls :meth:`KVCache.update` with the keys/values of the *new*
positions ``[pos, pos + L)``, attends over the returned views ``[0, pos + L)``, and after the last
layer the model calls :meth:`KVCache.advance` with ``L``.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer for positions ``[0, pos)``.

    Args:
        num_layers: transformer depth.
        batch_size: rows (with classifier-free guidance: conditional + unconditional rows).
        n_kv_heads: key/value heads per layer.
        max_len: positions the buffers hold.
        head_dim: channels per head.
        dtype, device: of the buffers (use the model's).
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if min(num_layers, batch_size, n_kv_heads, max_len, head_dim) < 1:
            raise ValueError("KVCache sizes must all be >= 1")
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.batch_size = batch_size
        self.pos = 0

    @property
    def num_layers(self) -> int:
        return len(self.k)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' ``k``/``v`` (B, n_kv_heads, L, head_dim) at ``[pos, pos + L)``.

        Returns:
            views of all keys and values so far, (B, n_kv_heads, pos + L, head_dim).
        """
        new = k.shape[2]
        end = self.pos + new
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        if k.shape[0] != self.batch_size:
            raise ValueError(f"KV cache holds {self.batch_size} rows, got {k.shape[0]}")
        self.k[layer][:, :, self.pos : end] = k
        self.v[layer][:, :, self.pos : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Move the position counter past the ``n`` positions just written by every layer."""
        if self.pos + n > self.max_len:
            raise ValueError(f"KV cache full: {self.pos + n} positions > max_len {self.max_len}")
        self.pos += n

    def reset(self) -> None:
        """Forget every position (buffers are reused, not cleared: positions >= pos are never read)."""
        self.pos = 0
