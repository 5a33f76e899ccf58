"""Continuous batching: who runs in the next engine step, and how many of their tokens.

Each step takes one decode token from every running sequence, then fills the rest of the per-step
token budget with (chunked) prefill of admitted and newly admitted sequences. KV memory is a fixed
pool of blocks; when a decode needs a block and none is free, the youngest running sequence is
preempted (its blocks freed, recomputed later), so the oldest always progresses: no deadlock.

With prefix caching, a sequence being admitted takes the cached blocks that hold its leading full blocks
(router/prefix_cache.py) and is prefilled from the first token they do not hold; a sequence whose next
block is being computed right now by a running sequence waits a step for it instead of computing it twice
(so `n` choices of one prompt, and requests arriving together with a shared preamble, compute it once).
Blocks are registered in the cache as they fill. Requests that ask for prompt logprobs compute their whole
prompt (they need its logits).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from grokserve.router.errors import QueueFull
from grokserve.router.kv_blocks import BlockAllocator, BlockKey
from grokserve.router.prefix_cache import PrefixCacheStats, block_keys
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
                 on_allocate: Callable[[list[int]], None] = lambda blocks: None, prefix_root: bytes | None = None,
                 share_in_step: bool = True):
        self.allocator = allocator
        self.on_allocate = on_allocate  # the KV cache forgets what newly allocated blocks held before
        self.max_queue = max_queue
        self.max_running = max_running
        self.token_budget = token_budget
        self.prefix_root = prefix_root  # None: prefix caching off
        # a prefill may read blocks another sequence of the same step computes (one forward call: the model
        # writes a layer's K/V of all the step's prefill tokens before any of them attends); not with
        # micro-batch overlap, whose two halves are separate forward calls
        self.share_in_step = share_in_step
        self.prefix_stats = PrefixCacheStats()
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    # ---- admission -----------------------------------------------------------------------------

    def add(self, *seqs: Sequence) -> None:
        """Queue the sequences of one request: all of them, or none (QueueFull) when the queue lacks room."""
        if len(self.waiting) + len(seqs) > self.max_queue:
            raise QueueFull(f"admission queue is full ({self.max_queue} waiting sequences)")
        self.waiting.extend(seqs)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished, cancelled or failed sequence and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.allocator.release(seq.blocks)
        seq.blocks = []
        seq.num_computed_tokens = 0
        seq.registered_blocks = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        need = self.allocator.blocks_for(tokens) - len(seq.blocks)
        if need <= 0:
            return True
        got = self.allocator.allocate(need)
        if got is None:
            return False
        self.on_allocate(got)
        seq.blocks.extend(got)
        return True

    # ---- prefix cache --------------------------------------------------------------------------

    def _cacheable_blocks(self, seq: Sequence) -> int:
        """Leading full blocks of `seq` the cache may supply: all but the last token must be computed anyway,
        so that the step that computes it samples the next one."""
        if self.prefix_root is None or seq.params.prompt_logprobs is not None:
            return 0
        return (seq.num_tokens - 1) // self.allocator.block_size

    def _keys(self, seq: Sequence, count: int) -> list:
        assert self.prefix_root is not None
        return block_keys(seq, count, self.allocator.block_size, self.prefix_root)

    def _take_cached(self, seq: Sequence) -> None:
        """Map `seq`'s leading blocks onto cached ones (it holds no blocks yet)."""
        for key in self._keys(seq, self._cacheable_blocks(seq)):
            block = self.allocator.lookup(key)
            if block is None:
                break
            self.allocator.share(block)
            seq.blocks.append(block)
        seq.registered_blocks = len(seq.blocks)
        seq.num_computed_tokens = len(seq.blocks) * self.allocator.block_size

    def _completes(self, chunk: ScheduledChunk, step_blocks: dict[bytes, tuple[int, BlockKey]]) -> None:
        """Note the cacheable blocks `chunk` fills completely in this step (a prefill chunk: the prefill group)."""
        seq, bs = chunk.seq, self.allocator.block_size
        if chunk.num_tokens < 2:
            return
        end = min(self._cacheable_blocks(seq), (chunk.start + chunk.num_tokens) // bs)
        for j, key in enumerate(self._keys(seq, end)[chunk.start // bs:], start=chunk.start // bs):
            step_blocks.setdefault(key.digest, (seq.blocks[j], key))

    def _take_in_step(self, seq: Sequence, step_blocks: dict[bytes, tuple[int, BlockKey]], budget: int) -> None:
        """Map `seq`'s next blocks onto blocks this step's prefills compute, when its own chunk is a prefill too."""
        bs = self.allocator.block_size
        taken = []
        for key in self._keys(seq, self._cacheable_blocks(seq))[len(seq.blocks):]:
            entry = step_blocks.get(key.digest)
            if entry is None or entry[1] != key:
                break
            taken.append(entry[0])
        if not taken or min(seq.num_tokens - (len(seq.blocks) + len(taken)) * bs, budget) < 2:
            return  # its chunk would be one token: the decode group, which attends before the prefills write
        for block in taken:
            self.allocator.share(block)
        seq.blocks.extend(taken)
        seq.registered_blocks = len(seq.blocks)  # registered by the sequence that computes them
        seq.num_computed_tokens = len(seq.blocks) * bs

    def _next_block_digest(self, seq: Sequence) -> bytes | None:
        """The digest of the first cacheable block `seq` would compute itself, if any."""
        held = len(seq.blocks)
        if held >= self._cacheable_blocks(seq):
            return None
        return self._keys(seq, held + 1)[held].digest

    def _in_flight(self) -> set[bytes]:
        """Digests of full prompt blocks that running sequences have still to compute."""
        digests: set[bytes] = set()
        for seq in self.running:
            computed = seq.num_computed_tokens // self.allocator.block_size
            upto = min(self._cacheable_blocks(seq), len(seq.prompt_ids) // self.allocator.block_size)
            if computed < upto:  # past its prompt (decoding) a sequence has nothing in flight: no key list per step
                digests.update(key.digest for key in self._keys(seq, upto)[computed:])
        return digests

    def register_computed(self, seq: Sequence) -> None:
        """Register the blocks `seq` has filled since the last call (after each step that computed it)."""
        if self.prefix_root is None:
            return
        full = min(seq.num_computed_tokens // self.allocator.block_size, len(seq.blocks))
        if full <= seq.registered_blocks:
            return
        for i, key in enumerate(self._keys(seq, full)[seq.registered_blocks:], start=seq.registered_blocks):
            self.allocator.register(seq.blocks[i], key)
        seq.registered_blocks = full

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
        step_blocks: dict[bytes, tuple[int, BlockKey]] = {}
        if self.prefix_root is not None and self.share_in_step:
            for chunk in out.chunks:
                self._completes(chunk, step_blocks)
        # 2. admit waiting sequences while budget, batch slots and blocks last
        in_flight = self._in_flight() if self.prefix_root is not None else set()
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if self.prefix_root is not None:
                self._take_cached(seq)
                if step_blocks:
                    self._take_in_step(seq, step_blocks, budget)
                if self._next_block_digest(seq) in in_flight:  # being computed, not all in this step: wait
                    self._free(seq)
                    deferred.append(self.waiting.popleft())
                    continue
            count = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow(seq, seq.num_computed_tokens + count):
                self._free(seq)  # cached blocks taken above go back (still cached)
                break
            self.waiting.popleft()
            self.running.append(seq)
            if seq.first_scheduled is None:
                seq.first_scheduled = time.monotonic()
            if self.prefix_root is not None:
                self.prefix_stats.queries += seq.num_tokens
                self.prefix_stats.hits += seq.num_computed_tokens
                cached = seq.num_computed_tokens // self.allocator.block_size
                in_flight.update(k.digest for k in self._keys(seq, self._cacheable_blocks(seq))[cached:])
            out.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, count))
            if self.prefix_root is not None and self.share_in_step:
                self._completes(out.chunks[-1], step_blocks)
            budget -= count
        self.waiting.extendleft(reversed(deferred))
        return out
