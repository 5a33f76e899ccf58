"""The model runner: one SchedulerOutput → a StepBatch (flat tokens + attention groups) → GrokModel.forward →
logits of the tokens that sample.

It owns the layout contract (model/batch.py). A step's tokens are laid out flat, decode tokens first and
then the prefill chunks, so the dense matmuls and the MoE see exactly the N real tokens. Decode rows attend
as one [B, 1] group; prefill chunks as one [P, W] group right-padded to the longest chunk, whose padding
slots send their K/V to the paged cache's null block and whose outputs are never read. Each row's block
table (padded with the null block 0) tells the cache where its keys live.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import numpy as np
import torch

from grokserve.model.batch import StepBatch, group_rows
from grokserve.model.dense import GrokModel
from grokserve.router.kv_blocks import PagedKVCache
from grokserve.router.scheduler import ScheduledChunk, SchedulerOutput


@dataclass
class StepResult:
    """What one step computed: logits [S, V] (f32, on the host) for the chunks that sample, in order."""

    sampling_chunks: list[ScheduledChunk]
    logits: torch.Tensor
    num_tokens: int
    # chunks of prompts that asked for prompt logprobs, each with the logits [n, V] (f32, host) of its tokens
    prompt_logits: list[tuple[ScheduledChunk, torch.Tensor]] = field(default_factory=list)


class ModelRunner:
    def __init__(self, model: GrokModel, cache: PagedKVCache):
        self.model = model
        self.cache = cache
        self.device = model.dense.device

    async def execute(self, scheduled: SchedulerOutput, micro_batches: int = 1) -> StepResult:
        """Forward every chunk (in `micro_batches` interleaved halves when asked), then the head on the last
        token of each chunk that samples."""
        chunks = scheduled.chunks
        halves = [chunks] if micro_batches < 2 or len(chunks) < 2 else [chunks[: len(chunks) // 2],
                                                                           chunks[len(chunks) // 2:]]
        outputs = await asyncio.gather(*(self._forward(half) for half in halves))
        sampling: list[ScheduledChunk] = []
        last_hidden = []
        prompt_logits = []
        for hidden, (ordered, last_token) in outputs:
            picks = [i for i, chunk in enumerate(ordered) if chunk.samples_next_token]
            if picks:
                sampling += [ordered[i] for i in picks]
                last_hidden.append(hidden.index_select(0, torch.from_numpy(last_token[picks]).to(hidden.device)))
            for i, chunk in enumerate(ordered):
                if chunk.seq.params.prompt_logprobs is not None and chunk.start < len(chunk.seq.prompt_ids) - 1:
                    end = int(last_token[i]) + 1
                    rows = hidden[end - chunk.num_tokens:end]  # [n, D]: this chunk's tokens
                    prompt_logits.append((chunk, self.model.dense.head(rows).float().cpu()))
        logits = (self.model.dense.head(torch.cat(last_hidden)).cpu() if last_hidden
                  else torch.empty(0, self.model.config.vocab_size))  # [S, V]
        return StepResult(sampling, logits, scheduled.num_scheduled_tokens, prompt_logits)

    async def _forward(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, tuple[list[ScheduledChunk],
                                                                                         np.ndarray]]:
        """Chunks → (hidden [N, D], (the chunks in flat order, each one's last flat token))."""
        batch, ordered, last_token = self.build_inputs(chunks)
        return await self.model.forward(batch, self.cache), (ordered, last_token)

    def build_inputs(self, chunks: list[ScheduledChunk]) -> tuple[StepBatch, list[ScheduledChunk], np.ndarray]:
        """The step's flat batch (decode tokens first, then prefill chunks) on the model's device."""
        decodes = [c for c in chunks if c.num_tokens == 1]
        prefills = [c for c in chunks if c.num_tokens > 1]
        total = len(decodes) + sum(c.num_tokens for c in prefills)
        groups, tokens, positions = [], [], []
        first = 0
        for part in (decodes, prefills):
            if not part:
                continue
            rows = [c.seq.all_ids[c.start:c.start + c.num_tokens] for c in part]
            group, flat_tokens, flat_positions = group_rows(rows, [c.start for c in part], self._tables(part),
                                                            first, total, self.device)
            groups.append(group)
            tokens.append(flat_tokens)
            positions.append(flat_positions)
            first += len(flat_tokens)
        ordered = decodes + prefills
        last_token = np.cumsum([c.num_tokens for c in ordered]) - 1
        batch = StepBatch(torch.from_numpy(np.concatenate(tokens)).to(self.device),
                          torch.from_numpy(np.concatenate(positions)).to(self.device), groups)
        return batch, ordered, last_token

    def _tables(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Block tables [B, max_blocks] of these chunks' sequences, padded with the null block 0."""
        width = max(len(c.seq.blocks) for c in chunks)
        tables = np.zeros((len(chunks), width), dtype=np.int64)
        for b, chunk in enumerate(chunks):
            tables[b, :len(chunk.seq.blocks)] = chunk.seq.blocks
        return torch.from_numpy(tables).to(self.device)
