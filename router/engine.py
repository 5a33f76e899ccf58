"""The router's engine loop: scheduler → model runner (dense here, experts via the backend) → sample → stream.

It runs as a task on the engine's event loop, and so do the client API's handlers and a dispatcher to
remote experts: one thread does the router's Python work, with no thread hop per layer and no lock
ping-pong per token. Steps run back to back; after each, the loop runs the handlers until they have
written the step's outputs to their streams (bounded by `stream_yield_s`), then the next step starts. A
failure that belongs to one sequence (sampling, detokenisation) ends that sequence alone; a failed forward
pass (a dead shard) fails only the sequences of that step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from grokserve.model.dense import GrokModel
from grokserve.model.sampling import SampledToken, finish_reason, sample_batch
from grokserve.router.errors import RequestTimedOut, RouterShuttingDown, SequenceFailed, StepFailed
from grokserve.router.kv_blocks import BlockAllocator, PagedKVCache, kv_bytes_per_token
from grokserve.router.metrics import RouterMetrics
from grokserve.router.model_runner import ModelRunner, StepResult
from grokserve.router.prefix_cache import PrefixCacheStats, root_digest
from grokserve.router.scheduler import Scheduler, SchedulerOutput
from grokserve.router.sequence import Sequence, StepOutput
from grokserve.router.settings import EngineLimits
from grokserve.transport import wire
from grokserve.transport.errors import DispatchError, PlacementMismatch, ShardUnavailable
from grokserve.transport.loop_thread import LoopThread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepRecord:
    """What one engine step computed: all its tokens, how many sequences it decoded together, and its wall
    time from scheduling to the last output handed to a sink."""

    tokens: int
    decode_sequences: int
    seconds: float
    cpu_seconds: float  # the engine thread's CPU time (what the step cost, without time stolen by neighbours)


class RouterEngine:
    """`loop`: the event loop the engine runs on, shared with the expert dispatcher (which must be built on
    it); without one the engine starts a loop of its own and stops it at shutdown."""

    def __init__(self, model: GrokModel, limits: EngineLimits | None = None, metrics: RouterMetrics | None = None,
                 loop: LoopThread | None = None):
        limits = limits or EngineLimits()
        self.model = model
        self.config = model.config
        self.limits = limits
        self.metrics = metrics or RouterMetrics(self.config)
        model.expert_choice_observer = self.metrics.expert_choices.observe
        self.metrics.queue_capacity.set(limits.max_queue)
        dtype = model.dense.dtype
        num_blocks = max(2, limits.kv_cache_bytes // (kv_bytes_per_token(self.config, dtype) * limits.block_size))
        self.allocator = BlockAllocator(num_blocks, limits.block_size)
        self.cache = PagedKVCache(self.config, num_blocks, limits.block_size, dtype, model.dense.device)
        self.runner = ModelRunner(model, self.cache)
        prefix_root = root_digest(wire.model_id(self.config), str(dtype)) if limits.prefix_cache else None
        self.scheduler = Scheduler(self.allocator, limits.max_queue, limits.max_running, limits.max_step_tokens,
                                   on_allocate=self.cache.clear_blocks, prefix_root=prefix_root,
                                   share_in_step=not limits.micro_batch_overlap)
        self._prefix_seen = PrefixCacheStats()
        self._owns_loop = loop is None
        self.loop: LoopThread = loop if loop is not None else LoopThread("router-engine")
        self._lock = threading.Lock()  # guards the scheduler between the service thread and the loop
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[StepOutput], None], StepOutput]]] = {}
        self.outputs_delivered = 0  # outputs handed to sinks on the engine's own loop
        self.outputs_written = 0  # … and reported written to their streams (output_written)
        self._stopping = False
        self.steps = 0
        self.recent_steps: collections.deque[StepRecord] = collections.deque(maxlen=1024)
        self._preemptions_seen = 0
        self._wake: asyncio.Event
        self._loop_task: asyncio.Task = self.loop.run(self._start())

    async def _start(self) -> asyncio.Task:
        self._wake = asyncio.Event()  # created on the engine's loop, before the loop task can look for it
        return asyncio.get_running_loop().create_task(self._run(), name="router-engine")

    # ---- called from the service's thread -----------------------------------------------------

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.capacity_tokens

    def is_alive(self) -> bool:
        """The engine loop is running (it ends only at shutdown or on a bug)."""
        return not self._loop_task.done()

    def failure(self) -> str:
        """Why the engine loop ended ('' while it runs)."""
        if not self._loop_task.done():
            return ""
        if self._loop_task.cancelled():
            return "cancelled"
        exc = self._loop_task.exception()
        return f"{type(exc).__name__}: {exc}" if exc else "stopped"

    def submit(self, *seqs: Sequence) -> None:
        """Queue a request's sequences (all or none); raises QueueFull at the bound."""
        with self._lock:
            self.scheduler.add(*seqs)
        self.metrics.prompt_tokens.inc(sum(len(seq.prompt_ids) for seq in seqs))
        self._notify()

    def cancel(self, seq: Sequence) -> None:
        """The sequence leaves the batch before the next step; its blocks are freed then."""
        seq.cancelled = True
        self._notify()

    def _notify(self) -> None:
        """Wake the loop task (directly from the engine's own loop, thread-safely from anywhere else)."""
        try:
            on_loop = asyncio.get_running_loop() is self.loop.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._wake.set()
        else:
            self.loop.loop.call_soon_threadsafe(self._wake.set)

    def load(self) -> dict[str, float]:
        with self._lock:
            return {"waiting": len(self.scheduler.waiting), "running": len(self.scheduler.running),
                    "kv_usage": self.allocator.usage(), "free_blocks": self.allocator.free,
                    "total_blocks": self.allocator.num_blocks - 1,
                    "referenced_blocks": self.allocator.referenced,
                    "cached_blocks": self.allocator.cached_unreferenced,
                    "prefix_cache_hit_rate": (self.scheduler.prefix_stats.hits
                                              / max(1, self.scheduler.prefix_stats.queries))}

    def shutdown(self) -> None:
        """Finish the loop: requests still running or waiting end with UNAVAILABLE."""
        self._stopping = True
        self.loop.loop.call_soon_threadsafe(self._wake.set)
        with contextlib.suppress(Exception):  # best effort at shutdown
            self.loop.run(asyncio.wait_for(asyncio.shield(self._loop_task), 10))
        if self._owns_loop:
            self.loop.stop()

    # ---- the loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        # No autograd on this thread (an inference_mode block cannot span the awaits of two interleaved halves).
        torch.set_grad_enabled(False)
        while not self._stopping:
            started = time.perf_counter(), time.thread_time()
            with self._lock:
                self._drop_ended()
                scheduled = self.scheduler.schedule()
                self._update_gauges()
            if not scheduled:
                with self._lock:
                    self._flush_outbox()  # cancellations and deadlines of this round
                self._wake.clear()
                await self._wait_for_work()
                continue
            try:
                result = await self._execute(scheduled)
            except RequestTimedOut as exc:
                self._fail(scheduled, exc)
            except (ShardUnavailable, PlacementMismatch) as exc:
                self._fail(scheduled, exc)
            except DispatchError as exc:
                log.error("a worker refused this router's message (a bug): %s", exc)
                self._fail(scheduled, exc)
            except Exception as exc:  # a bug must not kill the engine: fail this step's requests, go on
                log.exception("engine step failed")
                self._fail(scheduled, StepFailed(f"engine step failed: {type(exc).__name__}: {exc}"))
            else:
                self._finish_step(scheduled, result, started)
            with self._lock:
                self._update_gauges()
                self._flush_outbox()
            await self._yield_to_streams()
        with self._lock:
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                self._finish(seq, StepOutput(error=RouterShuttingDown("router is shutting down")))
            self._flush_outbox()

    async def _execute(self, scheduled: SchedulerOutput) -> StepResult:
        """Run the step, but never past the deadline of the last of its requests: a step stuck on a hung shard
        ends (RequestTimedOut) once none of its requests can still use its result."""
        step = self.runner.execute(scheduled, 2 if self.limits.micro_batch_overlap else 1)
        latest = max(chunk.seq.deadline for chunk in scheduled.chunks)
        try:
            return await asyncio.wait_for(step, None if latest == float("inf") else latest - time.monotonic())
        except TimeoutError:
            raise RequestTimedOut("every request of a stalled engine step passed its deadline") from None

    async def _wait_for_work(self) -> None:
        """Sleep until a submission or cancellation, or until the earliest waiting deadline passes."""
        with self._lock:
            deadlines = [s.deadline for s in (*self.scheduler.running, *self.scheduler.waiting)]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _drop_ended(self) -> None:
        """Cancelled sequences and those past their deadline leave before the next step. Caller holds the lock."""
        now = time.monotonic()
        for seq in [s for s in (*self.scheduler.running, *self.scheduler.waiting) if s.cancelled or s.deadline <= now]:
            if seq.cancelled:
                self._finish(seq, StepOutput(finish_reason="cancelled"))
            else:
                self._finish(seq, StepOutput(error=RequestTimedOut(
                    f"request deadline passed after {now - seq.arrival:.2f}s in the router")))

    def _fail(self, scheduled: SchedulerOutput, error: Exception) -> None:
        with self._lock:
            for chunk in scheduled.chunks:
                self._finish(chunk.seq, StepOutput(error=error))

    def _finish(self, seq: Sequence, output: StepOutput) -> None:
        """Remove a sequence (blocks freed now) and send its last message. Caller holds the lock."""
        if seq.finished:
            return
        seq.finished = True
        self.scheduler.remove(seq)
        now = time.monotonic()
        m = self.metrics  # the request itself is counted once, where its RPC ends (service.py)
        m.e2e.observe(now - seq.arrival)
        if seq.first_scheduled is not None:
            m.queue_time.observe(seq.first_scheduled - seq.arrival)
        output.prompt_tokens = len(seq.prompt_ids)
        output.completion_tokens = len(seq.output_ids)
        for key, value in seq.timings(now).items():
            setattr(output, key, value)
        self._emit(seq, output)

    def _emit(self, seq: Sequence, output: StepOutput) -> None:
        """Hand an output to its sink: at once when the sink lives on this loop (or has no loop), else queued
        and delivered in one batch per event loop at the end of the step."""
        if seq.sink_loop is None or seq.sink_loop is self.loop.loop:
            seq.sink(output)
            self.outputs_delivered += seq.sink_loop is not None
        else:
            self._outbox.setdefault(seq.sink_loop, []).append((seq.sink, output))

    def output_written(self) -> None:
        """The client API wrote one delivered output to its stream (called on the engine's loop)."""
        self.outputs_written += 1

    async def _yield_to_streams(self) -> None:
        """Let the loop's other tasks run: submissions and cancellations get in, and the handlers write this
        step's outputs before the next step holds the loop (at most `stream_yield_s`: a slow client's flow
        control never stalls the engine)."""
        await asyncio.sleep(0)
        deadline = time.perf_counter() + self.limits.stream_yield_s
        while self.outputs_written < self.outputs_delivered and time.perf_counter() < deadline:
            await asyncio.sleep(0)
        self.outputs_written = self.outputs_delivered  # what was not written by now is not waited for again

    def _flush_outbox(self) -> None:
        """One thread-safe wake-up per client loop per step, instead of one per token."""
        for loop, items in self._outbox.items():
            loop.call_soon_threadsafe(_deliver, items)
        self._outbox = {}

    def _finish_step(self, scheduled: SchedulerOutput, result: StepResult, started: tuple[float, float]) -> None:
        self.steps += 1
        self.metrics.expert_choices.end_step()
        with self._lock:
            for chunk in scheduled.chunks:
                chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
                self.scheduler.register_computed(chunk.seq)
        for chunk, logits in result.prompt_logits:
            self._record_prompt_logprobs(chunk.seq, chunk.start, logits)
        with self._lock:
            live = [(i, c.seq) for i, c in enumerate(result.sampling_chunks) if not (c.seq.finished or c.seq.cancelled)]
            tokens = self._sample([seq for _, seq in live], result.logits[[i for i, _ in live]], self.config.eos_id)
            for (_, seq), token in zip(live, tokens, strict=True):
                try:
                    if isinstance(token, Exception):
                        raise token
                    self._advance(seq, token)
                except Exception as exc:  # this sequence's own failure: it ends alone, its batch goes on
                    log.exception("sequence %s failed", seq.request_id)
                    self._finish(seq, StepOutput(error=SequenceFailed(
                        f"request {seq.request_id} failed: {type(exc).__name__}: {exc}")))
        record = StepRecord(tokens=result.num_tokens, decode_sequences=sum(c.is_decode for c in scheduled.chunks),
                            seconds=time.perf_counter() - started[0], cpu_seconds=time.thread_time() - started[1])
        self.recent_steps.append(record)
        self.metrics.step_tokens.observe(record.tokens)
        self.metrics.step_seconds.observe(record.seconds)

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, start: int, logits: torch.Tensor) -> None:
        """Logits [n, V] of prompt positions start.. → the logprob of each next prompt token, with the top
        alternatives; positions already recorded (a recomputation after preemption) are skipped."""
        prompt = seq.prompt_ids
        first = len(seq.prompt_logprobs) - start  # first row not yet recorded
        count = min(logits.shape[0], len(prompt) - 1 - start) - first
        if first < 0 or count <= 0:
            return
        logprobs = torch.log_softmax(logits[first:first + count].float(), dim=-1)  # [c, V]
        targets = torch.tensor(prompt[start + first + 1:start + first + 1 + count])
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top = seq.params.prompt_logprobs or 0
        values, ids = torch.topk(logprobs, top, dim=-1) if top else (None, None)
        for j in range(count):
            alternatives = list(zip(ids[j].tolist(), values[j].tolist(), strict=True)) if top else []  # type: ignore[index]
            seq.prompt_logprobs.append(SampledToken(int(targets[j]), chosen[j], alternatives))

    def _update_gauges(self) -> None:
        """Batch and KV gauges, after a step's sequences have advanced or finished. Caller holds the lock."""
        m = self.metrics
        m.running.set(len(self.scheduler.running))
        m.waiting.set(len(self.scheduler.waiting))
        m.kv_usage.set(self.allocator.usage())
        m.prefix_cache_blocks.set(self.allocator.cached_unreferenced)
        stats, seen = self.scheduler.prefix_stats, self._prefix_seen
        if stats.queries > seen.queries:
            m.prefix_cache_queries.inc(stats.queries - seen.queries)
            m.prefix_cache_hits.inc(stats.hits - seen.hits)
            seen.queries, seen.hits = stats.queries, stats.hits
        if self.scheduler.preemptions > self._preemptions_seen:
            m.preemptions.inc(self.scheduler.preemptions - self._preemptions_seen)
            self._preemptions_seen = self.scheduler.preemptions

    @staticmethod
    def _sample(seqs: list[Sequence], logits: torch.Tensor, eos_id: int) -> list[SampledToken | Exception]:
        """One token per sequence from logits [S, V], vectorised; if the batch fails, each row alone, so that
        a failure stays with the sequence it belongs to."""
        if not seqs:
            return []
        try:
            return list(sample_batch(logits, [s.params for s in seqs], [s.generator for s in seqs],
                                     [(s.prompt_ids, s.output_ids) for s in seqs], eos_id))
        except Exception:
            out: list[SampledToken | Exception] = []
            for row, seq in enumerate(seqs):
                try:
                    out.append(sample_batch(logits[row:row + 1], [seq.params], [seq.generator],
                                            [(seq.prompt_ids, seq.output_ids)], eos_id)[0])
                except Exception as exc:
                    out.append(exc)
            return out

    def _advance(self, seq: Sequence, token: SampledToken) -> None:
        """Append a sampled token to `seq`, stream it, and finish the sequence when a stop condition holds."""
        seq.output_ids.append(token.token_id)
        now = time.monotonic()
        self.metrics.generation_tokens.inc()
        if seq.first_token is None:
            self.metrics.ttft.observe(now - seq.arrival)
            seq.first_token = now
        elif seq.last_token is not None:
            self.metrics.itl.observe(now - seq.last_token)
        seq.last_token = now
        text = seq.text_stream.push(token.token_id)
        reason = finish_reason(token.token_id, seq.params, seq.text_stream.stopped, len(seq.output_ids),
                               seq.num_tokens, self.config.eos_id, self.config.max_seq_len)
        output = StepOutput(token_ids=[token.token_id], text=text, tokens=[token])
        if len(seq.output_ids) == 1 and seq.params.prompt_logprobs is not None:
            output.prompt_logprobs = seq.prompt_logprobs
        if reason is None:
            self._emit(seq, output)
            return
        output.text += seq.text_stream.finish()
        output.finish_reason = reason
        self._finish(seq, output)


def _deliver(items: list[tuple[Callable[[StepOutput], None], StepOutput]]) -> None:
    """Runs on a client loop: hand each output to its request's sink."""
    for sink, output in items:
        sink(output)
