"""Block-based KV memory for the router: a fixed pool of fixed-size blocks and per-sequence block tables.

`BlockAllocator` hands out block ids under a fixed memory budget; `PagedKVCache` stores K/V in those
blocks and, per engine step, gathers each sequence's blocks (its block table, from the model runner) into
the padded view attention reads. Block 0 is a permanently empty "null" block that pads block tables and
absorbs the writes of padding slots.
"""

from __future__ import annotations

import torch

from grokserve.model.config import GrokConfig
from grokserve.model.kv_cache import StepKV, hidden_keys


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (block 0 is reserved)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # block 0 is the null block

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks, or None (and nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    def usage(self) -> float:
        return 1.0 - len(self._free) / (self.num_blocks - 1)


def kv_bytes_per_token(config: GrokConfig, dtype: torch.dtype) -> int:
    return 2 * config.n_layers * config.kv_width * torch.empty((), dtype=dtype).element_size()


class PagedKVCache:
    """k/v storage [L, num_blocks, block_size, Hkv, d] and key validity [num_blocks, block_size].

    Row b of a step uses block table b ([B, max_blocks], padded with block 0): position p of that sequence
    lives at (table[b, p // block_size], p % block_size). Padding slots (query_valid False) write into the
    null block 0, whose keys are never valid.
    """

    def __init__(self, config: GrokConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
        self.block_size = block_size
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)  # per-layer views, made once

    def begin_step(self, storage: torch.Tensor, positions: torch.Tensor, query_valid: torch.Tensor,
                   key_valid: torch.Tensor) -> StepKV:
        tables = storage  # [B, max_blocks]
        index = (positions // self.block_size).clamp(max=tables.shape[1] - 1)  # [B, T]
        blocks = torch.where(query_valid, torch.gather(tables, 1, index), 0)  # [B, T] padding → null block
        offsets = positions % self.block_size  # [B, T]
        self.key_valid[blocks, offsets] = key_valid
        self.key_valid[0] = False
        batch, n_blocks = tables.shape
        span = n_blocks * self.block_size
        hidden = hidden_keys(self.key_valid[tables].view(batch, span), positions)  # [B, 1, 1, T, S]

        def update(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k_cache, v_cache = self.k_layers[layer], self.v_layers[layer]
            k_cache[blocks, offsets] = k
            v_cache[blocks, offsets] = v
            k_all = k_cache[tables].view(batch, span, *k.shape[2:])  # [B, S, Hkv, d]
            v_all = v_cache[tables].view(batch, span, *v.shape[2:])
            return k_all, v_all

        return StepKV(hidden, update)

    def clear_blocks(self, blocks: list[int]) -> None:
        """Forget a freed sequence's keys so a new owner never sees stale validity."""
        if blocks:
            self.key_valid[blocks] = False
