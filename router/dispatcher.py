"""The token-level all-to-all: one MoE layer's rows → the workers holding their experts → summed partials.

For each layer the dispatcher groups rows by destination shard (a row whose two experts sit on one shard
is sent once with both ids), sends one message per shard to all shards at once, each with a deadline,
and sums the partial outputs. Channels and streams stay open; a failed call is retried once on another
replica of the shard; when none answers, `ShardUnavailable` names the shard.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import grpc
import numpy as np
import torch

from grokserve.cluster.placement import PlacementPlan
from grokserve.model.config import GrokConfig
from grokserve.router.loop_thread import LoopThread
from grokserve.router.metrics import RouterMetrics
from grokserve.v1 import expert_pb2_grpc as pb_grpc
from grokserve.workers import wire
from grokserve.workers.server import message_limit
from grokserve.workers.staging import PinnedStaging
from grokserve.workers.tls import TlsFiles

log = logging.getLogger("grokserve.dispatcher")
Transport = Literal["unary", "stream"]
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
              grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


class DispatchError(RuntimeError):
    """A worker refused a message as malformed: a bug on the router side, not an outage."""


class ShardUnavailable(RuntimeError):
    """No replica of a shard answered within the deadline (→ UNAVAILABLE for the affected requests)."""

    def __init__(self, shard: str, layer: int, detail: str):
        super().__init__(f"expert shard '{shard}' unavailable for layer {layer}: {detail}")
        self.shard = shard
        self.layer = layer


class _CallFailed(Exception):
    def __init__(self, code: grpc.StatusCode, detail: str):
        super().__init__(detail)
        self.code = code


def _identity(raw: bytes) -> bytes:
    return raw


class _Stream:
    """A persistent ForwardStream. Answers are matched to waiting futures by call_id."""

    def __init__(self, call):
        self.call = call
        self.waiting: dict[int, asyncio.Future] = {}
        self.write_lock = asyncio.Lock()  # one write in flight per call (concurrent micro-batches share it)
        self.broken = False
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        failure = _CallFailed(grpc.StatusCode.UNAVAILABLE, "stream closed")
        try:
            async for response in self.call:
                future = self.waiting.pop(response.call_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            failure = _CallFailed(exc.code(), exc.details() or str(exc))
        except asyncio.CancelledError:
            pass
        finally:
            self.broken = True
            for future in self.waiting.values():
                if not future.done():
                    future.set_exception(failure)
            self.waiting.clear()

    async def exchange(self, call_id: int, request: bytes, timeout: float) -> wire.ResponseView:
        future = asyncio.get_running_loop().create_future()
        self.waiting[call_id] = future
        try:
            async with self.write_lock:
                await asyncio.wait_for(self.call.write(request), timeout)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            self.close()  # an unanswered stream is not trusted again
            raise _CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:.2f}s") from None
        except grpc.aio.AioRpcError as exc:
            self.close()
            raise _CallFailed(exc.code(), exc.details() or str(exc)) from None
        except asyncio.InvalidStateError:
            self.close()
            raise _CallFailed(grpc.StatusCode.UNAVAILABLE, "stream closed") from None
        finally:
            self.waiting.pop(call_id, None)

    def close(self) -> None:
        self.broken = True
        self.call.cancel()
        self.reader.cancel()


class _Replica:
    """Channel, raw-bytes stubs and (lazily) a persistent stream to one worker. Lives on the I/O loop."""

    def __init__(self, address: str, limit: int, tls: TlsFiles | None = None):
        self.address = address
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)]
        self.channel = (grpc.aio.secure_channel(address, tls.channel_credentials(), options + tls.channel_options())
                        if tls else grpc.aio.insecure_channel(address, options=options))
        # requests are pre-serialized bytes; answers parse zero-copy (wire.decode_response_bytes)
        self.forward = self.channel.unary_unary(
            "/grokserve.v1.ExpertService/Forward", request_serializer=_identity,
            response_deserializer=wire.decode_response_bytes)
        self.forward_stream = self.channel.stream_stream(
            "/grokserve.v1.ExpertService/ForwardStream", request_serializer=_identity,
            response_deserializer=wire.decode_response_bytes)
        self.info = pb_grpc.ExpertServiceStub(self.channel).Info
        self.stream: _Stream | None = None
        self.down_until = 0.0

    def get_stream(self) -> _Stream:
        if self.stream is None or self.stream.broken:
            self.stream = _Stream(self.forward_stream())
        return self.stream

    async def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        await self.channel.close()


@dataclass
class DispatchStats:
    """Accumulated per-call timings, for benchmarks and metrics."""

    calls: int = 0
    retries: int = 0
    failures: int = 0
    round_trip_seconds: float = 0.0
    worker_compute_seconds: float = 0.0
    last_compute_seconds: float = 0.0  # the slowest shard's compute in the last forward (they run in parallel)
    per_shard_calls: dict[str, int] = field(default_factory=dict)
    per_replica_calls: dict[str, int] = field(default_factory=dict)  # answered calls per replica address


class Dispatcher:
    """ExpertBackend over gRPC. `endpoints[shard name]` = addresses of that shard's replicas."""

    def __init__(self, config: GrokConfig, plan: PlacementPlan, endpoints: dict[str, list[str]],
                 dtype: torch.dtype, deadline_s: float = 10.0, transport: Transport = "stream",
                 down_backoff_s: float = 1.0, metrics: RouterMetrics | None = None, tls: TlsFiles | None = None):
        self.config = config
        self.plan = plan.check(config)
        self.dtype = dtype
        self.deadline_s = deadline_s
        self.transport = transport
        self.down_backoff_s = down_backoff_s
        self.limit = message_limit(config.d_model, 1 << 16, config.n_experts_per_token)
        owners = plan.owners(config)
        # owner[layer, expert] = index of the shard that serves it (the first that holds it)
        self.owner_np = np.array([[o[0] for o in per_layer] for per_layer in owners], dtype=np.int64)  # [L, E]
        self.replicas: dict[str, list[_Replica]] = {}  # touched only on the I/O loop (and read by endpoints())
        self._rr: dict[str, itertools.count] = {}
        self._call_ids = itertools.count(1)
        self._io = LoopThread("dispatch-io")
        self.stats = DispatchStats()
        self.metrics = metrics
        self.tls = tls
        self.staging = PinnedStaging()
        for shard in plan.shards:
            self.set_endpoints(shard.name, endpoints.get(shard.name, []))

    # ---- endpoint management (static lists, or Ray discovery updates) --------------------------

    def set_endpoints(self, shard: str, addresses: list[str]) -> None:
        """Replace a shard's replica addresses; keeps open channels to addresses that stay."""
        self._io.run(self._set_endpoints(shard, list(addresses)), timeout=10)

    async def _set_endpoints(self, shard: str, addresses: list[str]) -> None:
        old = {r.address: r for r in self.replicas.get(shard, [])}
        self.replicas[shard] = [old.pop(a) if a in old else _Replica(a, self.limit, self.tls) for a in addresses]
        if self.metrics is not None:
            self.metrics.shard_replicas.labels(shard).set(len(addresses))
        self._rr.setdefault(shard, itertools.count())
        for gone in old.values():
            await gone.close()

    def endpoints(self) -> dict[str, list[str]]:
        return {s: [r.address for r in reps] for s, reps in self.replicas.items()}

    def close(self) -> None:
        async def close_all():
            for reps in self.replicas.values():
                for r in reps:
                    await r.close()
            self.replicas.clear()

        self._io.run(close_all(), timeout=10)
        self._io.stop()

    # ---- the all-to-all ------------------------------------------------------------------------

    def run(self, coroutine):
        """Run a coroutine (typically a whole engine step) on the dispatcher's I/O loop and wait for it."""
        return self._io.run(coroutine)

    def forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor
                ) -> torch.Tensor:
        """Synchronous form of `forward_async`, from any thread but the I/O loop's."""
        return self._io.run(self.forward_async(layer, hidden, expert_ids, gates))

    async def forward_async(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor
                            ) -> torch.Tensor:
        """hidden [N, D], expert_ids [N, K], gates f32 [N, K] → Σ partials [N, D] in the activation dtype.

        Runs on the I/O loop. Routing uses numpy: per-op cost matters at decode sizes (N = batch).
        """
        n_rows = hidden.shape[0]
        device = hidden.device
        out = torch.zeros(n_rows, self.config.d_model, dtype=torch.float32)  # [N, D]
        if n_rows == 0:
            return out.to(device=device, dtype=self.dtype)
        hidden = self.staging.to_host(hidden.to(self.dtype))  # GPU: pinned, non-blocking
        ids_np = expert_ids.cpu().numpy()  # [N, K]
        gates = gates.cpu()
        slot_owner = self.owner_np[layer][ids_np]  # [N, K] shard index per slot
        jobs = []
        for shard_index in np.unique(slot_owner).tolist():
            mine = slot_owner == shard_index  # [N, K]
            rows_np = np.flatnonzero(mine.any(axis=1))  # [n]
            rows = torch.from_numpy(rows_np)
            ids = torch.from_numpy(np.where(mine, ids_np, -1)[rows_np])  # [n, K]
            all_rows = len(rows_np) == n_rows
            call_id = next(self._call_ids)
            request = wire.encode_request_bytes(call_id, layer, hidden if all_rows else hidden[rows], ids,
                                                gates if all_rows else gates[rows])
            jobs.append((self.plan.shards[shard_index].name, rows, call_id, request))
        started = time.perf_counter()
        responses = await self._exchange(layer, jobs, time.monotonic() + self.deadline_s)
        if self.metrics is not None:
            self.metrics.dispatch_layer.labels(str(layer)).observe(time.perf_counter() - started)
        self.stats.last_compute_seconds = 0.0
        for (shard, rows, _, _), response in zip(jobs, responses, strict=True):
            self.stats.calls += 1
            self.stats.worker_compute_seconds += response.compute_seconds
            self.stats.last_compute_seconds = max(self.stats.last_compute_seconds, response.compute_seconds)
            self.stats.per_shard_calls[shard] = self.stats.per_shard_calls.get(shard, 0) + 1
            partial = wire.decode_partial(response, len(rows), self.config.d_model, self.dtype)
            if len(jobs) == 1:  # one shard answered for every row: nothing to sum
                return self.staging.to_device(partial, device) if device.type == "cuda" else partial.clone()
            out.index_add_(0, rows, partial.float())
        return self.staging.to_device(out.to(self.dtype), device)

    async def _exchange(self, layer: int, jobs: list, deadline: float) -> list[wire.ResponseView]:
        """All shards at once; the first error (after its retry) is raised once every call has ended."""
        results = await asyncio.gather(*(self._call_shard(layer, shard, call_id, request, deadline)
                                         for shard, _, call_id, request in jobs), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]

    async def _call_shard(self, layer: int, shard: str, call_id: int, request: bytes, deadline: float
                          ) -> wire.ResponseView:
        m = self.metrics
        started = time.perf_counter()
        replica = self._pick(shard, exclude=None)
        try:
            response = await self._call(replica, call_id, request, deadline)
        except _CallFailed as first:
            if first.code not in _RETRYABLE:
                raise DispatchError(f"shard '{shard}' ({replica.address if replica else '-'}) refused layer "
                                    f"{layer}: {first}") from None
            self._mark_down(replica)
            self.stats.retries += 1
            if m is not None:
                m.retries.labels(shard).inc()
            retry = self._pick(shard, exclude=replica)
            try:
                response = await self._call(retry, call_id, request, deadline)
            except _CallFailed as second:
                self._mark_down(retry)
                self.stats.failures += 1
                if m is not None:
                    m.failures.labels(shard).inc()
                detail = f"{first}" if retry is None else f"{first}; retry on {retry.address}: {second}"
                raise ShardUnavailable(shard, layer, detail) from None
        if m is not None:
            m.dispatch_shard.labels(shard).observe(time.perf_counter() - started)
            m.bytes_sent.labels(shard).inc(len(request))
            m.bytes_received.labels(shard).inc(response.partial.nbytes)
        return response

    async def _call(self, replica: _Replica | None, call_id: int, request: bytes, deadline: float
                    ) -> wire.ResponseView:
        if replica is None:
            raise _CallFailed(grpc.StatusCode.UNAVAILABLE, "no live replica")
        timeout = max(0.001, deadline - time.monotonic())
        if self.transport == "stream":
            response = await replica.get_stream().exchange(call_id, request, timeout)
        else:
            try:
                response = await replica.forward(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                raise _CallFailed(exc.code(), exc.details() or str(exc)) from None
        if response.has_error:
            raise _CallFailed(_status_code(response.error_code), response.error_message)
        calls = self.stats.per_replica_calls
        calls[replica.address] = calls.get(replica.address, 0) + 1
        return response

    def _pick(self, shard: str, exclude: _Replica | None) -> _Replica | None:
        replicas = [r for r in self.replicas.get(shard, []) if r is not exclude]
        if not replicas:
            return None
        now = time.monotonic()
        healthy = [r for r in replicas if r.down_until <= now] or replicas
        return healthy[next(self._rr.setdefault(shard, itertools.count())) % len(healthy)]

    def _mark_down(self, replica: _Replica | None) -> None:
        if replica is not None:
            replica.down_until = time.monotonic() + self.down_backoff_s


def _status_code(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)
