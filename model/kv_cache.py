"""KV caches the dense model attends through: the interface, and a contiguous per-sequence cache.

A cache stores *rotated* keys. For each engine step it writes the new tokens' K/V at their positions and
returns everything a query may see, with the mask that says which keys each query may attend.
"""

from __future__ import annotations

from typing import Protocol

import torch

from grokserve.model.config import GrokConfig


class KVCache(Protocol):
    def begin_step(self, rows: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """Declare the step: cache rows [B], positions [B, T], key_valid bool [B, T] → attention mask [B, T, S]."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, T, Hkv, d] for this step; return all keys/values [B, S, Hkv, d] of those rows."""
        ...


class ContiguousKVCache:
    """One slot per position: k/v [L, R, S_max, Hkv, d] for R sequence rows; slot index = position.

    `key_valid[r, s]` is True where a real (non-pad) token was written at position s of row r.
    """

    def __init__(self, config: GrokConfig, rows: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (config.n_layers, rows, max_len, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(rows, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self._step: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def begin_step(self, rows: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        if int(positions.max()) >= self.max_len or int(positions.min()) < 0:
            raise ValueError(f"positions must lie in [0, {self.max_len}); got up to {int(positions.max())}")
        row_index = rows[:, None].expand_as(positions)  # [B, T]
        self.key_valid[row_index, positions] = key_valid
        span = int(positions.max()) + 1  # keys beyond the furthest position are never visible
        self._step = (row_index, positions, span)
        key_pos = torch.arange(span, device=positions.device)  # [S]
        visible = self.key_valid[rows, :span]  # [B, S]
        return visible[:, None, :] & (key_pos[None, None, :] <= positions[:, :, None])  # [B, T, S]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._step is not None, "begin_step must be called first"
        row_index, positions, span = self._step
        self.k[layer][row_index, positions] = k
        self.v[layer][row_index, positions] = v
        rows = row_index[:, 0]
        return self.k[layer][rows, :span], self.v[layer][rows, :span]
