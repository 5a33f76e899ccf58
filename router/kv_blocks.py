"""Block-based KV memory for the router: a fixed pool of fixed-size blocks and per-sequence block tables.

`BlockAllocator` hands out block ids under a fixed memory budget; `PagedKVCache` stores K/V in those
blocks and, per engine step, gathers each sequence's blocks into the padded view attention reads.
Block 0 is a permanently empty "null" block that pads block tables.
"""

from __future__ import annotations

import torch

from grokserve.model.config import GrokConfig
from grokserve.model.kv_cache import StepKV, causal_mask


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

    Before each step the engine sets `tables` [B, max_blocks] (padded with block 0); row b of the step
    uses table b, and position p of a sequence lives at (tables[b, p // bs], p % bs).
    """

    def __init__(self, config: GrokConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (config.n_layers, num_blocks, block_size, config.n_kv_heads, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(num_blocks, block_size, dtype=torch.bool, device=device)
        self.block_size = block_size
        self.tables = torch.zeros(0, 1, dtype=torch.int64)

    def begin_step(self, rows: torch.Tensor, positions: torch.Tensor, key_valid: torch.Tensor) -> StepKV:
        tables = self.tables[rows]  # [B, max_blocks]
        index = positions // self.block_size  # [B, T]
        inside = index < tables.shape[1]
        # Padding slots carry positions past their row's table (the engine's convention): they write into
        # the null block 0, whose validity is forced back to False below.
        blocks = torch.where(inside, torch.gather(tables, 1, index.clamp(max=tables.shape[1] - 1)), 0)  # [B, T]
        offsets = positions % self.block_size  # [B, T]
        self.key_valid[blocks, offsets] = key_valid
        self.key_valid[0] = False
        batch, n_blocks = tables.shape
        span = n_blocks * self.block_size
        mask = causal_mask(self.key_valid[tables].view(batch, span), positions)  # [B, T, S]

        def update(layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.k[layer][blocks, offsets] = k
            self.v[layer][blocks, offsets] = v
            k_all = self.k[layer][tables].view(batch, span, *k.shape[2:])  # [B, S, Hkv, d]
            v_all = self.v[layer][tables].view(batch, span, *v.shape[2:])
            return k_all, v_all

        return StepKV(mask, update)

    def clear_blocks(self, blocks: list[int]) -> None:
        """Forget a freed sequence's keys so a new owner never sees stale validity."""
        if blocks:
            self.key_valid[blocks] = False
