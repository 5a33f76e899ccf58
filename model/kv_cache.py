"""KV caches the dense model attends through: the interface, and a contiguous per-sequence cache.

A cache stores *rotated* keys. For each engine step it writes the new tokens' K/V at their positions and
returns everything a query may see, with the mask that says which keys each query may attend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from grokserve.model.config import GrokConfig


@dataclass
class StepKV:
    """One forward call's view of a cache: which keys each query may not see, and per layer a write-then-read
    of K/V. Each call gets its own, so two halves of an engine step (micro-batch overlap) can run interleaved.
    """

    hidden: torch.Tensor  # bool [B, 1, 1, T, S]: key s is NOT visible to query t of row b (broadcasts over heads)
    update: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    # update(layer, k [B, T, Hkv, d], v) writes this call's keys and returns all keys/values [B, S, Hkv, d]


def hidden_keys(visible: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """visible bool [B, S] (key s is a real token), positions [B, T] → hidden bool [B, 1, 1, T, S]: the keys a
    query may not attend, i.e. not a real token or at a position after the query's."""
    key_pos = torch.arange(visible.shape[1], device=positions.device)  # [S]
    allowed = visible[:, None, :] & (key_pos[None, None, :] <= positions[:, :, None])  # [B, T, S]
    return (~allowed)[:, None, None]


class KVCache(Protocol):
    def begin_step(self, storage: torch.Tensor, positions: torch.Tensor, query_valid: torch.Tensor,
                   key_valid: torch.Tensor) -> StepKV:
        """Declare a forward call of B rows at positions [B, T]. `storage` says where each row's keys live:
        row ids [B] in a contiguous cache, block tables [B, max_blocks] in a paged one. query_valid bool
        [B, T] is False on padding (its K/V must not land in any sequence's storage); key_valid bool [B, T]
        is True where a real, non-pad token is written."""
        ...


class ContiguousKVCache:
    """One slot per position: k/v [L, R, S_max, Hkv, d] for R sequence rows; slot index = position.

    `key_valid[r, s]` is True where a real (non-pad) token was written at position s of row r.
    """

    def __init__(self, config: GrokConfig, rows: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        # one scratch slot past the end takes the writes of padding slots; it is never visible
        shape = (config.n_layers, rows, max_len + 1, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(rows, max_len + 1, dtype=torch.bool, device=device)
        self.max_len = max_len

    def begin_step(self, storage: torch.Tensor, positions: torch.Tensor, query_valid: torch.Tensor,
                   key_valid: torch.Tensor) -> StepKV:
        """storage = row ids [B]. Padding (right-padded prompts) lies past each row's real tokens in its own
        row, written invalid and overwritten when the row grows: harmless."""
        rows = storage
        if int(positions.max()) >= self.max_len or int(positions.min()) < 0:
            raise ValueError(f"positions must lie in [0, {self.max_len}); got up to {int(positions.max())}")
        row_index = rows[:, None].expand_as(positions)  # [B, T]
        written = torch.where(query_valid, positions, self.max_len)  # padding writes the scratch slot
        self.key_valid[row_index, written] = key_valid
        self.key_valid[:, self.max_len] = False
        span = int(positions.max()) + 1  # keys beyond the furthest position are never visible
        hidden = hidden_keys(self.key_valid[rows, :span], positions)  # [B, 1, 1, T, S]

        def update(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.k[layer][row_index, written] = k
            self.v[layer][row_index, written] = v
            return self.k[layer][rows, :span], self.v[layer][rows, :span]

        return StepKV(hidden, update)
