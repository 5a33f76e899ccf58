"""The token-level all-to-all: one MoE layer's rows → the workers holding their experts → summed partials.

For each layer the dispatcher groups rows by destination shard (a row whose two experts sit on one shard
is sent once with both ids), sends one message per shard to all shards at once, each with a deadline,
and sums the partial outputs. Channels and streams stay open; a failed call is retried once on another
replica of the shard; when none answers, `ShardUnavailable` names the shard.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import grpc
import torch

from grokserve.cluster.placement import PlacementPlan
from grokserve.model.config import GrokConfig
from grokserve.v1 import expert_pb2_grpc as pb_grpc
from grokserve.workers import wire
from grokserve.workers.server import message_limit

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


_END = object()


class _Stream:
    """A persistent ForwardStream: requests go in through a queue, a reader thread collects answers."""

    def __init__(self, stub: _RawExpertStub):
        self.requests: queue.Queue = queue.Queue(maxsize=64)
        self.responses: queue.Queue = queue.Queue(maxsize=64)
        self.call = stub.forward_stream(iter(self.requests.get, _END))
        self.broken = False
        threading.Thread(target=self._read, daemon=True, name="expert-stream-reader").start()

    def _read(self) -> None:
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as exc:
            self.responses.put(_CallFailed(exc.code(), exc.details() or str(exc)))
        finally:
            self.broken = True
            self.responses.put(_CallFailed(grpc.StatusCode.UNAVAILABLE, "stream closed"))

    def send(self, request: bytes) -> None:
        self.requests.put_nowait(request)

    def receive(self, call_id: int, timeout: float) -> wire.ResponseView:
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.responses.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.close()
                raise _CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:.2f}s") from None
            if isinstance(item, _CallFailed):
                raise item
            if item.call_id == call_id:
                return item
            # an answer to a call we gave up on earlier: drop it

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(queue.Full):
            self.requests.put_nowait(_END)
        self.call.cancel()


class _RawExpertStub:
    """ExpertService calls whose requests are pre-serialized bytes and whose answers parse zero-copy."""

    def __init__(self, channel: grpc.Channel):
        self.forward = channel.unary_unary(
            "/grokserve.v1.ExpertService/Forward", request_serializer=_identity,
            response_deserializer=wire.decode_response_bytes, _registered_method=True)
        self.forward_stream = channel.stream_stream(
            "/grokserve.v1.ExpertService/ForwardStream", request_serializer=_identity,
            response_deserializer=wire.decode_response_bytes, _registered_method=True)
        self.info = pb_grpc.ExpertServiceStub(channel).Info


def _identity(raw: bytes) -> bytes:
    return raw


class _Replica:
    def __init__(self, address: str, limit: int):
        self.address = address
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000)])
        self.stub = _RawExpertStub(self.channel)
        self.stream: _Stream | None = None
        self.down_until = 0.0
        self.lock = threading.Lock()

    def get_stream(self) -> _Stream:
        if self.stream is None or self.stream.broken:
            self.stream = _Stream(self.stub)
        return self.stream

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.channel.close()


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


class Dispatcher:
    """ExpertBackend over gRPC. `endpoints[shard name]` = addresses of that shard's replicas."""

    def __init__(self, config: GrokConfig, plan: PlacementPlan, endpoints: dict[str, list[str]],
                 dtype: torch.dtype, deadline_s: float = 10.0, transport: Transport = "stream",
                 down_backoff_s: float = 1.0):
        self.config = config
        self.plan = plan.check(config)
        self.dtype = dtype
        self.deadline_s = deadline_s
        self.transport = transport
        self.down_backoff_s = down_backoff_s
        self.limit = message_limit(config.d_model, 1 << 16, config.n_experts_per_token)
        owners = plan.owners(config)
        # owner[layer, expert] = index of the shard that serves it (the first that holds it)
        self.owner = torch.tensor([[o[0] for o in per_layer] for per_layer in owners], dtype=torch.int64)
        self.replicas: dict[str, list[_Replica]] = {}
        self._rr: dict[str, itertools.count] = {}
        self._lock = threading.Lock()
        self._call_ids = itertools.count(1)
        self.stats = DispatchStats()
        for shard in plan.shards:
            self.set_endpoints(shard.name, endpoints.get(shard.name, []))

    # ---- endpoint management (static lists, or Ray discovery updates) --------------------------

    def set_endpoints(self, shard: str, addresses: list[str]) -> None:
        """Replace a shard's replica addresses; keeps open channels to addresses that stay."""
        with self._lock:
            old = {r.address: r for r in self.replicas.get(shard, [])}
            new = [old.pop(a) if a in old else _Replica(a, self.limit) for a in addresses]
            self.replicas[shard] = new
            self._rr.setdefault(shard, itertools.count())
        for gone in old.values():
            gone.close()

    def endpoints(self) -> dict[str, list[str]]:
        with self._lock:
            return {s: [r.address for r in reps] for s, reps in self.replicas.items()}

    def close(self) -> None:
        with self._lock:
            for reps in self.replicas.values():
                for r in reps:
                    r.close()
            self.replicas.clear()

    # ---- the all-to-all ------------------------------------------------------------------------

    def forward(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, gates: torch.Tensor
                ) -> torch.Tensor:
        """hidden [N, D], expert_ids [N, K], gates f32 [N, K] → Σ partials [N, D] in the activation dtype."""
        n_rows = hidden.shape[0]
        out = torch.zeros(n_rows, self.config.d_model, dtype=torch.float32)  # [N, D]
        if n_rows == 0:
            return out.to(self.dtype)
        hidden = hidden.to(self.dtype).cpu()
        expert_ids = expert_ids.cpu()
        slot_owner = self.owner[layer][expert_ids]  # [N, K] shard index per slot
        jobs = []
        for shard_index in torch.unique(slot_owner).tolist():
            mine = slot_owner == shard_index  # [N, K]
            rows = mine.any(dim=1).nonzero().squeeze(1)  # [n]
            ids = torch.where(mine, expert_ids, torch.full_like(expert_ids, -1))[rows]  # [n, K]
            jobs.append((self.plan.shards[shard_index].name, rows, ids, gates[rows]))
        deadline = time.monotonic() + self.deadline_s
        for (_shard, rows, _, _), partial in zip(jobs, self._exchange(layer, hidden, jobs, deadline), strict=True):
            out.index_add_(0, rows, partial.float())
        return out.to(self.dtype)

    def _exchange(self, layer: int, hidden: torch.Tensor, jobs: list, deadline: float) -> list[torch.Tensor]:
        """Send every shard its message at once; wait for all; retry a failure once on another replica."""
        n_rows = hidden.shape[0]
        requests = [(call_id := next(self._call_ids),
                     wire.encode_request_bytes(call_id, layer, hidden if len(rows) == n_rows else hidden[rows], ids, g))
                    for _, rows, ids, g in jobs]
        pending = [self._start(shard, req, deadline, exclude=None) for (shard, *_), req in zip(jobs, requests,
                                                                                                 strict=True)]
        results = []
        self.stats.last_compute_seconds = 0.0
        for (shard, rows, _, _), req, (replica, handle) in zip(jobs, requests, pending, strict=True):
            try:
                response = self._finish(replica, handle, req, deadline)
            except _CallFailed as first:
                if first.code not in _RETRYABLE:
                    raise DispatchError(f"shard '{shard}' ({replica.address if replica else '-'}) refused layer "
                                        f"{layer}: {first}") from None
                self._mark_down(replica)
                self.stats.retries += 1
                retry_replica, retry_handle = self._start(shard, req, deadline, exclude=replica)
                try:
                    response = self._finish(retry_replica, retry_handle, req, deadline)
                except _CallFailed as second:
                    self._mark_down(retry_replica)
                    self.stats.failures += 1
                    detail = f"{first}" if retry_replica is None else f"{first}; retry: {second}"
                    raise ShardUnavailable(shard, layer, detail) from None
            self.stats.calls += 1
            self.stats.worker_compute_seconds += response.compute_seconds
            self.stats.last_compute_seconds = max(self.stats.last_compute_seconds, response.compute_seconds)
            self.stats.per_shard_calls[shard] = self.stats.per_shard_calls.get(shard, 0) + 1
            results.append(wire.decode_partial(response, len(rows), self.config.d_model, self.dtype))
        return results

    def _pick(self, shard: str, exclude: _Replica | None) -> _Replica | None:
        with self._lock:
            replicas = [r for r in self.replicas.get(shard, []) if r is not exclude]
            counter = self._rr.setdefault(shard, itertools.count())
        if not replicas:
            return None
        now = time.monotonic()
        healthy = [r for r in replicas if r.down_until <= now] or replicas
        return healthy[next(counter) % len(healthy)]

    def _start(self, shard: str, req: tuple[int, bytes], deadline: float, exclude: _Replica | None):
        replica = self._pick(shard, exclude)
        if replica is None:
            return None, _CallFailed(grpc.StatusCode.UNAVAILABLE, "no live replica")
        timeout = max(0.001, deadline - time.monotonic())
        try:
            if self.transport == "unary":
                return replica, replica.stub.forward.future(req[1], timeout=timeout)
            with replica.lock:
                stream = replica.get_stream()
                stream.send(req[1])
            return replica, stream
        except (grpc.RpcError, queue.Full) as exc:
            return replica, _CallFailed(grpc.StatusCode.UNAVAILABLE, str(exc))

    def _finish(self, replica: _Replica | None, handle, req: tuple[int, bytes], deadline: float
                ) -> wire.ResponseView:
        if isinstance(handle, _CallFailed):
            raise handle
        timeout = max(0.001, deadline - time.monotonic())
        if isinstance(handle, _Stream):
            response = handle.receive(req[0], timeout)
            if response.has_error:
                raise _CallFailed(_status_code(response.error_code), response.error_message)
            return response
        try:
            return handle.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            handle.cancel()
            raise _CallFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:.2f}s") from None
        except grpc.RpcError as exc:
            raise _CallFailed(exc.code(), exc.details() or str(exc)) from None

    def _mark_down(self, replica: _Replica | None) -> None:
        if replica is not None:
            replica.down_until = time.monotonic() + self.down_backoff_s


def _status_code(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)
