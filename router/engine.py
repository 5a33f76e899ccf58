"""The router's engine loop: scheduler → one batched forward (dense here, experts via the backend) → sample.

It runs as a task on one event loop (the dispatcher's, so per-layer dispatch needs no thread hop). The
gRPC service submits and cancels sequences from its own thread; outputs go back through each
sequence's sink. A failed step (a dead shard) fails only the sequences in that step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import torch

from grokserve.model.dense import GrokModel
from grokserve.model.sampling import finish_reason, sample
from grokserve.router.dispatcher import ShardUnavailable
from grokserve.router.kv_blocks import BlockAllocator, PagedKVCache, kv_bytes_per_token
from grokserve.router.loop_thread import LoopThread
from grokserve.router.metrics import RouterMetrics
from grokserve.router.scheduler import QueueFull, ScheduledChunk, Scheduler
from grokserve.router.sequence import Sequence, StepOutput

log = logging.getLogger("grokserve.engine")


@dataclass(frozen=True)
class EngineLimits:
    max_queue: int = 256  # waiting requests before RESOURCE_EXHAUSTED
    max_running: int = 64  # sequences in one batch
    max_step_tokens: int = 512  # tokens computed per engine step (decode + prefill chunks)
    kv_cache_bytes: int = 64 << 20  # fixed KV memory budget
    block_size: int = 16  # tokens per KV block
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    micro_batch_overlap: bool = False  # split each step in two halves that overlap dispatch and attention


@dataclass(frozen=True)
class StepRecord:
    """What one engine step computed: all its tokens, and how many sequences it decoded together."""

    tokens: int
    decode_sequences: int


class RouterEngine:
    def __init__(self, model: GrokModel, limits: EngineLimits = EngineLimits(), metrics: RouterMetrics | None = None):
        self.model = model
        self.metrics = metrics
        if metrics is not None:
            model.route_observer = lambda layer, ids: metrics.routing.observe(layer, ids, self.config.n_experts)
            metrics.queue_capacity.set(limits.max_queue)
        self.config = model.config
        self.limits = limits
        dtype = model.dense.dtype
        num_blocks = max(2, limits.kv_cache_bytes // (kv_bytes_per_token(self.config, dtype) * limits.block_size))
        self.allocator = BlockAllocator(num_blocks, limits.block_size)
        self.cache = PagedKVCache(self.config, num_blocks, limits.block_size, dtype, model.dense.device)
        self.scheduler = Scheduler(self.allocator, limits.max_queue, limits.max_running, limits.max_step_tokens,
                                   on_free=self.cache.clear_blocks)
        # Steps run on the dispatcher's loop when experts are remote, else on a loop of our own.
        run_on = getattr(model.experts, "_io", None)
        self._own_loop = None if run_on is not None else LoopThread("engine")
        self.io: LoopThread = run_on if run_on is not None else self._own_loop
        self._lock = threading.Lock()  # guards the scheduler between the service thread and the loop
        self._wake = asyncio.Event()
        self._stopping = False
        self.steps = 0
        self.recent_steps: collections.deque[StepRecord] = collections.deque(maxlen=1024)
        self._preemptions_seen = 0
        self._task = self.io.run(self._start())

    async def _start(self) -> asyncio.Task:
        self._wake = asyncio.Event()
        return asyncio.get_running_loop().create_task(self._run())

    # ---- called from the service's thread -----------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.capacity_tokens

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; raises QueueFull at the bound."""
        with self._lock:
            self.scheduler.add(seq)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
        self.io.loop.call_soon_threadsafe(self._wake.set)

    def cancel(self, seq: Sequence) -> None:
        """The sequence leaves the batch before the next step; its blocks are freed then."""
        seq.cancelled = True
        self.io.loop.call_soon_threadsafe(self._wake.set)

    def load(self) -> dict[str, float]:
        with self._lock:
            return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                    "kv_usage": self.allocator.usage(), "free_blocks": self.allocator.free,
                    "total_blocks": self.allocator.num_blocks - 1}

    def shutdown(self) -> None:
        self._stopping = True
        self.io.loop.call_soon_threadsafe(self._wake.set)
        with contextlib.suppress(Exception):  # best effort at shutdown
            self.io.run(asyncio.wait_for(asyncio.shield(self._task), 10))
        if self._own_loop is not None:
            self._own_loop.stop()

    # ---- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        # No autograd on this thread (an inference_mode block cannot span the awaits of two interleaved halves).
        torch.set_grad_enabled(False)
        while not self._stopping:
            with self._lock:
                self._drop_cancelled()
                plan = self.scheduler.schedule()
                self._update_gauges()
            if not plan:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step(plan)
            except ShardUnavailable as exc:
                self._fail(plan, "UNAVAILABLE", str(exc))
            except Exception as exc:  # a bug must not kill the engine: fail this step's requests, go on
                log.exception("engine step failed")
                self._fail(plan, "INTERNAL", f"engine step failed: {type(exc).__name__}: {exc}")
            with self._lock:
                self._update_gauges()
            await asyncio.sleep(0)  # let cancellations and submissions in
        with self._lock:
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                self._finish(seq, StepOutput(error=("UNAVAILABLE", "router is shutting down")))

    def _drop_cancelled(self) -> None:
        for seq in [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.cancelled]:
            self._finish(seq, StepOutput(finish_reason="cancelled"))

    def _fail(self, plan: list[ScheduledChunk], code: str, message: str) -> None:
        with self._lock:
            for chunk in plan:
                self._finish(chunk.seq, StepOutput(error=(code, message)))

    def _finish(self, seq: Sequence, output: StepOutput) -> None:
        """Remove a sequence (blocks freed now) and send its last message. Caller holds the lock."""
        if seq.finished:
            return
        seq.finished = True
        self.scheduler.remove(seq)
        now = time.monotonic()
        m = self.metrics
        if m is not None:
            m.requests.labels(output.finish_reason or "error").inc()
            m.e2e.observe(now - seq.arrival)
            if seq.first_scheduled is not None:
                m.queue_time.observe(seq.first_scheduled - seq.arrival)
        output.prompt_tokens = len(seq.prompt_ids)
        output.completion_tokens = len(seq.output_ids)
        for key, value in seq.timings(now).items():
            setattr(output, key, value)
        seq.sink(output)

    async def _step(self, plan: list[ScheduledChunk]) -> None:
        rows = len(plan)
        max_blocks = max(len(chunk.seq.blocks) for chunk in plan)
        tables = torch.zeros(rows, max_blocks, dtype=torch.int64)
        for b, chunk in enumerate(plan):
            tables[b, :len(chunk.seq.blocks)] = torch.tensor(chunk.seq.blocks)
        self.cache.tables = tables.to(self.model.dense.device)
        sentinel = max_blocks * self.limits.block_size  # padding positions land in the null block
        # Micro-batch overlap (two-batch ping-pong): while one half waits for its experts, the other half
        # computes attention on this loop. Only worth it when experts are remote.
        halves = [list(range(rows))]
        if self.limits.micro_batch_overlap and rows >= 2 and self._own_loop is None:
            halves = [list(range(rows // 2)), list(range(rows // 2, rows))]
        outputs = await asyncio.gather(*(self._forward_rows(plan, idx, sentinel) for idx in halves))
        self.steps += 1
        record = StepRecord(tokens=sum(tokens for _, tokens in outputs),
                            decode_sequences=sum(1 for c in plan if c.start >= len(c.seq.prompt_ids)))
        self.recent_steps.append(record)
        self._record_step(record.tokens)
        last_hidden = {}  # plan row → hidden of its last computed token
        for idx, (hidden, _) in zip(halves, outputs, strict=True):
            for i, b in enumerate(idx):
                if plan[b].samples:
                    last_hidden[b] = hidden[i, plan[b].count - 1]
        for chunk in plan:
            chunk.seq.num_computed = chunk.start + chunk.count
        if not last_hidden:
            return
        order = sorted(last_hidden)
        logits = self.model.dense.head(torch.stack([last_hidden[b] for b in order])).cpu()  # [S, V]
        with self._lock:
            for i, b in enumerate(order):
                self._advance(plan[b].seq, logits[i])

    async def _forward_rows(self, plan: list[ScheduledChunk], idx: list[int], sentinel: int
                            ) -> tuple[torch.Tensor, int]:
        """Forward the chunks of plan rows `idx` (rows of the step's block tables) → hidden [b, T, D]."""
        width = max(plan[b].count for b in idx)
        tokens = torch.zeros(len(idx), width, dtype=torch.int64)
        positions = torch.full((len(idx), width), sentinel, dtype=torch.int64)
        for i, b in enumerate(idx):
            chunk = plan[b]
            tokens[i, :chunk.count] = torch.tensor(chunk.seq.all_ids[chunk.start:chunk.start + chunk.count])
            positions[i, :chunk.count] = torch.arange(chunk.start, chunk.start + chunk.count)
        query_valid = positions < sentinel
        device = self.model.dense.device
        hidden = await self.model.forward_async(tokens.to(device), positions.to(device), query_valid.to(device),
                                                self.cache, torch.tensor(idx, device=device))
        return hidden, int(query_valid.sum())

    def _record_step(self, tokens: int) -> None:
        m = self.metrics
        if m is None:
            return
        m.routing.end_step()
        m.step_tokens.observe(tokens)

    def _update_gauges(self) -> None:
        """Batch and KV gauges, after a step's sequences have advanced or finished. Caller holds the lock."""
        m = self.metrics
        if m is None:
            return
        m.running.set(len(self.scheduler.running))
        m.waiting.set(len(self.scheduler.waiting))
        m.kv_usage.set(self.allocator.usage())
        if self.scheduler.preemptions > self._preemptions_seen:
            m.preemptions.inc(self.scheduler.preemptions - self._preemptions_seen)
            self._preemptions_seen = self.scheduler.preemptions

    def _advance(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Sample one token for `seq`, stream it, and finish the sequence when a stop condition holds."""
        if seq.finished or seq.cancelled:
            return
        token = sample(logits, seq.params, seq.generator)
        seq.output_ids.append(token.token_id)
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
            if seq.first_token is None:
                self.metrics.ttft.observe(now - seq.arrival)
            elif seq.last_token is not None:
                self.metrics.itl.observe(now - seq.last_token)
        if seq.first_token is None:
            seq.first_token = now
        seq.last_token = now
        text = seq.text.push(token.token_id)
        reason = finish_reason(token.token_id, seq.params, seq.text.stopped, len(seq.output_ids), seq.num_tokens,
                               self.config.eos_id, self.config.max_seq_len)
        output = StepOutput(token_ids=[token.token_id], text=text, tokens=[token])
        if reason is None:
            seq.sink(output)
            return
        output.text += seq.text.finish()
        output.finish_reason = reason
        self._finish(seq, output)


__all__ = ["EngineLimits", "QueueFull", "RouterEngine"]
