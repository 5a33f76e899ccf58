"""The model runner: one SchedulerOutput → padded input tensors → GrokModel.forward → logits to sample from.

It owns the padding contract. A step's chunks become rows of a [B, W] batch, W = the longest chunk; a
row's real tokens sit left, padding right. Padding slots have `query_valid` False: the paged cache sends
their K/V to the null block, the model leaves them out of the MoE, and their outputs are never read.
Each row's block table (padded with the null block 0) tells the cache where its keys live.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np
import torch

from grokserve.model.dense import GrokModel
from grokserve.router.kv_blocks import PagedKVCache
from grokserve.router.scheduler import ScheduledChunk, SchedulerOutput


@dataclass
class StepInputs:
    """One forward call's batch: tokens/positions [B, W], query_valid bool [B, W], block_tables [B, max_blocks]."""

    tokens: torch.Tensor
    positions: torch.Tensor
    query_valid: torch.Tensor
    block_tables: torch.Tensor


@dataclass
class StepResult:
    """What one step computed: logits [S, V] (f32, on the host) for the chunks that sample, in order."""

    sampling_chunks: list[ScheduledChunk]
    logits: torch.Tensor
    num_tokens: int


class ModelRunner:
    def __init__(self, model: GrokModel, cache: PagedKVCache):
        self.model = model
        self.cache = cache
        self.device = model.dense.device

    async def execute(self, scheduled: SchedulerOutput, micro_batches: int = 1) -> StepResult:
        """Forward every chunk (in `micro_batches` interleaved halves when asked), then the head on the last
        token of each chunk that samples."""
        chunks = scheduled.chunks
        rows = list(range(len(chunks)))
        groups = [rows] if micro_batches < 2 or len(rows) < 2 else [rows[: len(rows) // 2], rows[len(rows) // 2:]]
        hiddens = await asyncio.gather(*(self._forward([chunks[i] for i in group]) for group in groups))
        last_hidden: list[torch.Tensor] = []
        sampling: list[ScheduledChunk] = []
        for group, hidden in zip(groups, hiddens, strict=True):
            for i, row in enumerate(group):
                chunk = chunks[row]
                if chunk.samples_next_token:
                    sampling.append(chunk)
                    last_hidden.append(hidden[i, chunk.num_tokens - 1])
        logits = (self.model.dense.head(torch.stack(last_hidden)).cpu() if last_hidden
                  else torch.empty(0, self.model.config.vocab_size))  # [S, V]
        return StepResult(sampling, logits, scheduled.num_scheduled_tokens)

    async def _forward(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Chunks → hidden [B, W, D]."""
        inputs = self.build_inputs(chunks)
        return await self.model.forward(inputs.tokens, inputs.positions, inputs.query_valid, self.cache,
                                        inputs.block_tables)

    def build_inputs(self, chunks: list[ScheduledChunk]) -> StepInputs:
        """The padded batch of these chunks, on the model's device."""
        width = max(c.num_tokens for c in chunks)
        n_blocks = max(len(c.seq.blocks) for c in chunks)
        tokens = np.zeros((len(chunks), width), dtype=np.int64)
        positions = np.zeros((len(chunks), width), dtype=np.int64)
        valid = np.zeros((len(chunks), width), dtype=bool)
        tables = np.zeros((len(chunks), n_blocks), dtype=np.int64)  # block 0 = the null block
        for b, chunk in enumerate(chunks):
            end = chunk.start + chunk.num_tokens
            tokens[b, :chunk.num_tokens] = chunk.seq.all_ids[chunk.start:end]
            positions[b, :chunk.num_tokens] = np.arange(chunk.start, end)
            valid[b, :chunk.num_tokens] = True
            tables[b, :len(chunk.seq.blocks)] = chunk.seq.blocks
        device = self.device
        return StepInputs(torch.from_numpy(tokens).to(device), torch.from_numpy(positions).to(device),
                          torch.from_numpy(valid).to(device), torch.from_numpy(tables).to(device))
