"""The expert worker: loads its shard from a grokserve checkpoint and serves ExpertService on grpc.aio.

Health is NOT_SERVING until the weights are resident, then SERVING; on shutdown it turns NOT_SERVING
and in-flight calls drain before the server stops. Every request is parsed here (undecodable bytes are
refused, on a stream in-band, and the stream stays open) and validated by `wire.decode_request`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, TypeVar, cast

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from pydantic import BaseModel, ConfigDict, Field

from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.model.dtypes import torch_dtype
from grokserve.model.experts import LocalExperts
from grokserve.transport import wire
from grokserve.transport.staging import PinnedStaging
from grokserve.transport.tls import TlsFiles
from grokserve.v1 import expert_pb2 as pb
from grokserve.workers.metrics import WorkerMetrics
from grokserve.workers.shm_server import AttachRefused, SharedMemoryServer

log = logging.getLogger(__name__)
SERVICE_NAME = "grokserve.v1.ExpertService"
T = TypeVar("T")


class WorkerSettings(BaseModel):
    """One expert worker: what it holds and how it serves. The CLI and the cluster spec take their defaults
    from here."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    checkpoint: Path
    shard: dict[int, list[int]] = Field(description="layer → expert ids held")
    dtype: str = "float32"
    weights: Literal["dense", "int8"] = Field(default="dense", description="int8: the release's int8 experts kept "
                                              "as int8 with bf16 scales (half of bf16's memory)")
    device: str = "cpu"
    max_rows: int = Field(default=4096, ge=1, description="largest number of rows accepted per message")
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)
    drain_seconds: float = Field(default=10.0, ge=0)
    # Requests up to this many hidden elements (N·D) are computed on the event loop itself: a thread hop
    # costs more than their compute. Larger ones go to the compute thread so the loop keeps doing I/O.
    inline_elements: int = Field(default=1 << 16, ge=0)
    metrics_port: int | None = Field(default=None, description="None: no /metrics; 0: any free port")
    metrics_port_span: int = 1
    shard_name: str = "standalone"
    tls: TlsFiles | None = None  # with ca_file: mutual TLS, only routers with a certificate of that CA get in
    shared_memory: bool = Field(default=True, description="offer same-host routers the shared-memory data plane")


class WeightsNotLoaded(RuntimeError):
    """A call arrived before the shard's weights are resident (→ UNAVAILABLE)."""


class _Undecodable(ValueError):
    """Bytes that are not a ForwardRequest (→ INVALID_ARGUMENT naming the message)."""


def parse_request(data: bytes | memoryview) -> wire.RequestView:
    """The request's fields, its tensors viewed in place (gRPC bytes or a shared-memory slot)."""
    try:
        return wire.parse_request(data)
    except wire.WireError as exc:
        raise _Undecodable(f"request: undecodable ForwardRequest ({exc})") from None


def _leading_call_id(data: bytes | memoryview) -> int:
    """call_id (field 1, a varint, first on the wire) of a message that did not parse; 0 when unreadable."""
    if len(data) < 2 or data[0] != 0x08:
        return 0
    value = 0
    for i, byte in enumerate(bytes(data[1:11])):
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value
    return 0


class ExpertServicer:
    """Registered before the server starts; answers UNAVAILABLE until `attach` gives it the weights.

    `answer` is the one path from request bytes to answer bytes, whatever carries them: gRPC or a
    shared-memory slot (workers/shm_server.py) give it the request's buffer and a `write` that puts the
    answer where its transport wants it.
    """

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics):
        self.settings = settings
        self.metrics = metrics
        self.experts: LocalExperts | None = None
        self.limits: wire.ShardLimits | None = None
        # One compute thread: torch parallelises inside a matmul; the event loop stays free for I/O.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-compute")
        self.staging = PinnedStaging()
        self.shm: SharedMemoryServer | None = None  # set by ExpertWorker when shared memory is offered

    def attach(self, experts: LocalExperts) -> None:
        config = experts.config
        self.limits = wire.ShardLimits(
            hidden_size=config.d_model, n_layers=config.n_layers, n_experts=config.n_experts,
            dtype=experts.dtype, max_rows=self.settings.max_rows, held=experts.shard)
        self.experts = experts
        self.metrics.weights.labels(self.metrics.shard).set(experts.resident_bytes())
        self.metrics.ready.labels(self.metrics.shard).set(1)

    def _compute(self, req: wire.DecodedRequest, call_id: int, write: Callable[[wire.WireMessage], T]
                 ) -> tuple[T, float]:
        """Compute and write the answer in one go: on GPU the partial sits in a reused pinned buffer until
        written. A row whose other slots belong to another worker (-1) gets its partial in f32, so the router
        rounds the two workers' sum once, as the reference rounds its two-expert sum."""
        assert self.experts is not None
        start = time.perf_counter()
        device = self.experts.device
        split_rows = self.experts.dtype != torch.float32 and bool((req.expert_ids < 0).any())
        with torch.inference_mode():
            partial = self.experts.compute(req.layer, self.staging.to_device(req.hidden, device), req.expert_ids,
                                           req.expert_probs.to(device), torch.float32 if split_rows else None)
            partial = self.staging.to_host(partial)
        seconds = time.perf_counter() - start
        return write(wire.response_message(call_id, partial, seconds)), seconds

    async def answer(self, data: bytes | memoryview, write: Callable[[wire.WireMessage], T],
                     refuse: Callable[[int, int, str], T]) -> T:
        """Request bytes → `write(answer)`; a refused request → `refuse(call_id, grpc code, message)`. Small
        requests are computed on the event loop itself (a thread hop costs more than their compute), large
        ones in the compute thread so the loop keeps doing I/O."""
        prepared = self._prepare(data, refuse)
        if not isinstance(prepared, wire.DecodedRequest):
            return prepared[0]
        if prepared.hidden.numel() <= self.settings.inline_elements:
            return self._finish(prepared, write)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._finish, prepared, write)

    def answer_now(self, data: bytes | memoryview, write: Callable[[wire.WireMessage], T],
                   refuse: Callable[[int, int, str], T]) -> T:
        """The same, computed in the calling thread (a shared-memory attachment's own thread)."""
        prepared = self._prepare(data, refuse)
        return prepared[0] if not isinstance(prepared, wire.DecodedRequest) else self._finish(prepared, write)

    def _prepare(self, data: bytes | memoryview, refuse: Callable[[int, int, str], T]
                 ) -> wire.DecodedRequest | tuple[T]:
        """Parse and validate; a refused request comes back as (refuse(...),)."""
        call_id = 0
        m = self.metrics
        try:
            request = parse_request(data)
            call_id = request.call_id
            if self.limits is None or self.experts is None:
                raise WeightsNotLoaded("expert weights are still loading")
            try:
                decoded = wire.decode_request(request, self.limits)
            except wire.WireError as exc:
                m.rejected.labels(m.shard, exc.field).inc()
                raise
            decoded.call_id = call_id
            return decoded
        except _Undecodable as exc:
            m.rejected.labels(m.shard, "request").inc()
            return (refuse(_leading_call_id(data), grpc.StatusCode.INVALID_ARGUMENT.value[0], str(exc)),)
        except wire.WireError as exc:
            return (refuse(call_id, grpc.StatusCode.INVALID_ARGUMENT.value[0], str(exc)),)
        except WeightsNotLoaded as exc:
            return (refuse(call_id, grpc.StatusCode.UNAVAILABLE.value[0], str(exc)),)

    def _finish(self, decoded: wire.DecodedRequest, write: Callable[[wire.WireMessage], T]) -> T:
        m = self.metrics
        assert self.experts is not None
        m.in_flight.labels(m.shard).inc()
        try:
            answer, seconds = self._compute(decoded, decoded.call_id, write)
        finally:
            m.in_flight.labels(m.shard).dec()
        m.compute.labels(m.shard).observe(seconds)
        m.count_tokens(decoded.layer, decoded.expert_ids.numpy(), self.experts.config.n_experts)
        return answer

    async def Forward(self, data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        refused: list[tuple[int, str]] = []

        def refuse(call_id: int, code: int, message: str) -> bytes:
            refused.append((code, message))
            return b""

        answer = await self.answer(data, wire.WireMessage.tobytes, refuse)
        if refused:
            code, message = refused[0]
            await context.abort(grpc.StatusCode.UNAVAILABLE if code == grpc.StatusCode.UNAVAILABLE.value[0]
                                else grpc.StatusCode.INVALID_ARGUMENT, message)
        return answer

    async def ForwardStream(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
                            ) -> AsyncIterator[bytes]:
        """One answer per request, in order; a refused request is answered in-band and the stream goes on."""
        async for data in requests:
            yield await self.answer(data, wire.WireMessage.tobytes, wire.encode_stream_error_bytes)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        if self.experts is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "expert weights are still loading")
        assert self.experts is not None
        config = self.experts.config
        return pb.InfoResponse(
            model_id=wire.model_id(config), num_layers=config.n_layers, num_experts=config.n_experts,
            hidden_size=config.d_model, dtype=cast(pb.DType, wire.DTYPE_TO_WIRE[self.experts.dtype]),
            device=str(self.experts.device), max_rows=self.settings.max_rows,
            shard=[pb.LayerExperts(layer=layer, expert_ids=list(ids)) for layer, ids in self.experts.shard.items()],
            resident_bytes=self.experts.resident_bytes(), host_id=self.shm.host_id if self.shm else "",
            shared_memory=self.shm is not None and self.shm.available, weights=self.experts.weight_mode)

    async def AttachSharedMemory(self, request: pb.AttachRequest, context: grpc.aio.ServicerContext
                                 ) -> pb.AttachResponse:
        if self.shm is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "shared memory is off on this worker")
        assert self.shm is not None
        try:
            return self.shm.attach(request)
        except AttachRefused as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        raise AssertionError("unreachable: context.abort raises")


def _raw(data: bytes) -> bytes:
    return data


def add_expert_service(servicer: ExpertServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_ExpertServiceServicer_to_server, but Forward/ForwardStream take raw bytes (parsed
    by the servicer, so undecodable input gets an answer) and answer serialized bytes
    (wire.encode_response_bytes), so both (de)serializers are the identity."""
    handlers = {
        "Forward": grpc.unary_unary_rpc_method_handler(
            servicer.Forward, request_deserializer=_raw, response_serializer=_raw),
        "ForwardStream": grpc.stream_stream_rpc_method_handler(
            servicer.ForwardStream, request_deserializer=_raw, response_serializer=_raw),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=pb.InfoRequest.FromString,
            response_serializer=pb.InfoResponse.SerializeToString),
        "AttachSharedMemory": grpc.unary_unary_rpc_method_handler(
            servicer.AttachSharedMemory, request_deserializer=pb.AttachRequest.FromString,
            response_serializer=pb.AttachResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


class ExpertWorker:
    """An expert worker's server lifecycle: bind → NOT_SERVING → load → SERVING → (stop) → NOT_SERVING → drain."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.ckpt = GrokserveCheckpoint(settings.checkpoint)
        config = self.ckpt.config
        limit = wire.max_message_bytes(config.d_model, settings.max_rows, config.n_experts_per_token)
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.metrics = WorkerMetrics(settings.shard_name)
        self.metrics_port: int | None = None
        self.servicer = ExpertServicer(settings, self.metrics)
        if settings.shared_memory:
            self.servicer.shm = SharedMemoryServer(self.servicer, limit, limit)
        add_expert_service(self.servicer, self.server)
        bind = f"{settings.host}:{settings.port}"
        self.port = (self.server.add_secure_port(bind, settings.tls.server_credentials()) if settings.tls
                     else self.server.add_insecure_port(bind))
        if self.port == 0:
            raise OSError(f"could not bind {settings.host}:{settings.port}")

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Serve (NOT_SERVING while loading), load the shard, then turn SERVING. A failed load stops the server
        before the error propagates."""
        from grokserve.transport.metrics_server import serve_metrics

        if self.settings.metrics_port is not None:
            self.metrics_port = serve_metrics(self.metrics.registry, self.settings.host, self.settings.metrics_port,
                                              self.settings.metrics_port_span)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.servicer.shm is not None:
            await self.servicer.shm.start()
        log.info("expert worker on %s loading shard %s", self.address, self.settings.shard_name)
        try:
            experts = await asyncio.get_running_loop().run_in_executor(None, self._load)
        except BaseException:
            await self.server.stop(None)
            raise
        self.servicer.attach(experts)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def _load(self) -> LocalExperts:
        return load_experts(self.ckpt, self.settings, progress=f"loading experts on {self.address}")

    async def stop(self) -> None:
        self.metrics.ready.labels(self.metrics.shard).set(0)
        log.info("expert worker on %s draining (up to %.0fs)", self.address, self.settings.drain_seconds)
        await self.health.enter_graceful_shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await self.server.stop(grace=self.settings.drain_seconds)
        if self.servicer.shm is not None:
            await self.servicer.shm.stop()
        self.servicer.executor.shutdown(wait=False, cancel_futures=True)
        log.info("expert worker on %s stopped", self.address)


def load_experts(ckpt: GrokserveCheckpoint, settings: WorkerSettings, progress: str | None = None) -> LocalExperts:
    """The shard's experts, each tensor read from disk once and converted (int8: kept as read) before the next
    is read: loading grows the process by the resident shard and one matrix (bench/int8.py)."""
    params = ckpt.lazy(ckpt.expert_names(settings.shard), progress=progress)
    try:
        return LocalExperts(ckpt.config, settings.shard, torch_dtype(settings.dtype), params, settings.device,
                            settings.weights)
    finally:
        params.close()
