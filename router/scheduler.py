"""Continuous batching: who runs in the next engine step, and how many of their tokens.

Each step takes one decode token from every running sequence, then fills the rest of the per-step
token budget with (chunked) prefill of admitted and newly admitted sequences. KV memory is a fixed
pool of blocks; when a decode needs a block and none is free, the youngest running sequence is
preempted (its blocks freed, recomputed later), so the oldest always progresses: no deadlock.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from grokserve.router.errors import QueueFull
from grokserve.router.kv_blocks import BlockAllocator
from grokserve.router.sequence import Sequence


@dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `seq`, from position `start`, computed in this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples_next_token(self) -> bool:
        """True when this chunk reaches the end of the known tokens: a new token is sampled after it."""
        return self.start + self.num_tokens == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return self.start >= len(self.seq.prompt_ids)


@dataclass
class SchedulerOutput:
    """One engine step: the chunks to compute, in batch-row order."""

    chunks: list[ScheduledChunk] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_queue: int, max_running: int, token_budget: int,
                 on_free: Callable[[list[int]], None] = lambda blocks: None):
        self.allocator = allocator
        self.on_free = on_free  # the KV cache forgets freed blocks' keys
        self.max_queue = max_queue
        self.max_running = max_running
        self.token_budget = token_budget
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    # ---- admission -----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"admission queue is full ({self.max_queue} waiting requests)")
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished, cancelled or failed sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.on_free(seq.blocks)
        self.allocator.release(seq.blocks)
        seq.blocks = []

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.num_computed_tokens = 0
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        need = self.allocator.blocks_for(tokens) - len(seq.blocks)
        if need <= 0:
            return True
        got = self.allocator.allocate(need)
        if got is None:
            return False
        seq.blocks.extend(got)
        return True

    # ---- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.token_budget
        planned: set[int] = set()
        # 1. running sequences, oldest first: a decode token each, or the next prefill chunk
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:  # preempted by an older sequence in this loop
                continue
            remaining = seq.num_tokens - seq.num_computed_tokens
            count = 1 if remaining == 1 else min(remaining, budget)
            while not self._grow(seq, seq.num_computed_tokens + count):
                victims = [s for s in reversed(self.running) if s is not seq and id(s) not in planned]
                if not victims:
                    break
                self._preempt(victims[0])  # the youngest unplanned sequence gives its blocks back
            held = len(seq.blocks) * self.allocator.block_size - seq.num_computed_tokens  # tokens that fit now
            count = min(count, held)
            if count <= 0:
                self._preempt(seq)  # even the youngest could not make room: wait for older ones to finish
                continue
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, count))
            planned.add(id(seq))
            budget -= count
        # 2. admit waiting sequences while budget, batch slots and blocks last
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            count = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow(seq, seq.num_computed_tokens + count):
                break
            self.waiting.popleft()
            self.running.append(seq)
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, count))
            budget -= count
        return out
