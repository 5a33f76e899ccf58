"""Block-based KV memory for the router: a fixed pool of fixed-size blocks and per-sequence block tables.

`BlockAllocator` hands out block ids under a fixed memory budget, counts references, and keeps blocks that
hold a full, registered prefix (router/prefix_cache.py) after their last reference goes: such blocks are
reused by requests with the same prefix and evicted least recently used first, only when an allocation
needs them. `PagedKVCache` stores K/V in those blocks and, per engine step, gathers each sequence's blocks
(its block table, from the model runner) into the padded view attention reads. Block 0 is a permanently
empty "null" block that pads block tables and absorbs the writes of padding slots.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from grokserve.model.config import GrokConfig
from grokserve.model.kv_cache import StepKV, hidden_keys


@dataclass(frozen=True)
class BlockKey:
    """What a full block holds: its token ids after the prefix `parent` (the previous block's digest), and the
    digest of both. Lookups compare the whole key, never the digest alone."""

    digest: bytes
    parent: bytes
    tokens: tuple[int, ...]


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("the KV cache needs at least 2 blocks (block 0 is reserved)")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))  # unregistered blocks; block 0 is the null block
        self._refs = [0] * num_blocks
        # registered blocks nobody references, least recently released first: evicted in this order
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._key_of: dict[int, BlockKey] = {}
        self._block_of: dict[bytes, int] = {}

    @property
    def free(self) -> int:
        """Blocks an allocation can take: never used, or cached and unreferenced (evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def cached_unreferenced(self) -> int:
        return len(self._cached)

    @property
    def referenced(self) -> int:
        return sum(1 for r in self._refs if r > 0)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks (one reference each), or None (and nothing taken) when fewer are free. Unused blocks go
        first, then cached ones, least recently used first (their prefix is forgotten)."""
        if count > self.free:
            return None
        got = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._cached.popitem(last=False)
                del self._block_of[self._key_of.pop(block).digest]
            self._refs[block] = 1
            got.append(block)
        return got

    def release(self, blocks: list[int]) -> None:
        """Drop one reference to each block. A block's last reference: back to the free list, or, when it holds a
        registered prefix, to the evictable cache (a sequence's last blocks are evicted before its first)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of:
                self._cached[block] = None
                self._cached.move_to_end(block)
            else:
                self._free.append(block)

    def lookup(self, key: BlockKey) -> int | None:
        """The block holding exactly `key` (digest, parent and tokens all equal), or None."""
        block = self._block_of.get(key.digest)
        if block is None or self._key_of[block] != key:  # a digest collision is a miss, never a wrong block
            return None
        return block

    def share(self, block: int) -> None:
        """One more reference to a registered block (taken out of the evictable cache)."""
        self._refs[block] += 1
        self._cached.pop(block, None)

    def register(self, block: int, key: BlockKey) -> None:
        """`block` (referenced, full, computed) holds `key`. When another block holds it already, this one stays
        unregistered (it is freed as usual)."""
        if key.digest in self._block_of or block in self._key_of:
            return
        self._key_of[block] = key
        self._block_of[key.digest] = block

    def clear_cache(self) -> None:
        """Forget every registered prefix (unreferenced cached blocks become free)."""
        for block in list(self._cached):
            self._free.append(block)
        self._cached.clear()
        self._key_of.clear()
        self._block_of.clear()

    def usage(self) -> float:
        """Fraction of blocks referenced by sequences (cached, unreferenced blocks count as free)."""
        return 1.0 - self.free / (self.num_blocks - 1)


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
