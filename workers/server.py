"""The expert worker: loads its shard from a grokserve checkpoint and serves ExpertService on grpc.aio.

Health is NOT_SERVING until the weights are resident, then SERVING; on shutdown it turns NOT_SERVING
and in-flight calls drain before the server stops. Each request is validated by `wire.decode_request`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from grokserve.model.checkpoint.grokserve_format import GrokserveCheckpoint
from grokserve.model.engine import torch_dtype
from grokserve.model.experts import ExpertModule
from grokserve.v1 import expert_pb2 as pb
from grokserve.workers import wire
from grokserve.workers.metrics import WorkerMetrics, serve_metrics
from grokserve.workers.staging import PinnedStaging
from grokserve.workers.tls import TlsFiles

log = logging.getLogger("grokserve.worker")
SERVICE_NAME = "grokserve.v1.ExpertService"


@dataclass
class WorkerSettings:
    checkpoint: Path
    shard: dict[int, list[int]]
    dtype: str = "float32"
    device: str = "cpu"
    max_rows: int = 4096
    host: str = "127.0.0.1"
    port: int = 0
    drain_seconds: float = 10.0
    # Requests up to this many hidden elements (N·D) are computed on the event loop itself: a thread hop
    # costs more than their compute. Larger ones go to the compute thread so the loop keeps doing I/O.
    inline_elements: int = 1 << 16
    metrics_port: int | None = None  # None: no /metrics; 0: any free port
    metrics_port_span: int = 1
    shard_name: str = "standalone"
    tls: TlsFiles | None = None  # with ca_file: mutual TLS, only routers with a certificate of that CA get in
    extra_options: list[tuple[str, int]] = field(default_factory=list)


def parse_layers(text: str, n_layers: int | None = None) -> list[int]:
    """'0-63' / '0,2,5-7' / 'all' → sorted layer indices."""
    if text == "all":
        if n_layers is None:
            raise ValueError("layers: 'all' needs the model's layer count")
        return list(range(n_layers))
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            lo, hi = part.split("-", 1)
            out.update(range(int(lo), int(hi) + 1))
        elif part:
            out.add(int(part))
    if not out:
        raise ValueError(f"layers: '{text}' names no layer")
    return sorted(out)


class WeightsNotLoaded(RuntimeError):
    """A call arrived before the shard's weights are resident (→ UNAVAILABLE)."""


class ExpertServicer:
    """Registered before the server starts; answers UNAVAILABLE until `attach` gives it the weights."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics | None = None):
        self.settings = settings
        self.metrics = metrics
        self.experts: ExpertModule | None = None
        self.limits: wire.ShardLimits | None = None
        # One compute thread: torch parallelises inside a matmul; the event loop stays free for I/O.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-compute")
        self.in_flight = 0
        self.staging = PinnedStaging()

    def attach(self, experts: ExpertModule) -> None:
        config = experts.config
        self.limits = wire.ShardLimits(
            hidden_size=config.d_model, n_layers=config.n_layers, n_experts=config.n_experts,
            dtype=experts.dtype, max_rows=self.settings.max_rows, held=experts.shard)
        self.experts = experts
        if self.metrics is not None:
            self.metrics.weights.labels(self.metrics.shard).set(experts.resident_bytes())
            self.metrics.ready.labels(self.metrics.shard).set(1)

    def _compute(self, req: wire.DecodedRequest, call_id: int, wire_dtype: int) -> tuple[bytes, float]:
        """Compute and encode in one go: on GPU the partial sits in a reused pinned buffer until encoded."""
        assert self.experts is not None
        start = time.perf_counter()
        device = self.experts.device
        with torch.inference_mode():
            partial = self.experts.forward(req.layer, self.staging.to_device(req.hidden, device), req.expert_ids,
                                           req.gates.to(device))
            partial = self.staging.to_host(partial)
        seconds = time.perf_counter() - start
        return wire.encode_response_bytes(call_id, wire_dtype, partial, seconds), seconds

    async def _answer(self, request: pb.ForwardRequest) -> bytes:
        """A serialized ForwardResponse (hand-encoded: one copy of the partial sums)."""
        if self.limits is None:
            raise WeightsNotLoaded("expert weights are still loading")
        m = self.metrics
        try:
            decoded = wire.decode_request(request, self.limits)
        except wire.WireError as exc:
            if m is not None:
                m.rejected.labels(m.shard, exc.field).inc()
            raise
        self.in_flight += 1
        if m is not None:
            m.in_flight.labels(m.shard).inc()
        try:
            if decoded.hidden.numel() <= self.settings.inline_elements:
                answer, seconds = self._compute(decoded, request.call_id, request.dtype)
            else:
                answer, seconds = await asyncio.get_running_loop().run_in_executor(
                    self.executor, self._compute, decoded, request.call_id, request.dtype)
        finally:
            self.in_flight -= 1
            if m is not None:
                m.in_flight.labels(m.shard).dec()
        if m is not None:
            m.compute.labels(m.shard).observe(seconds)
            ids = decoded.expert_ids[decoded.expert_ids >= 0]
            for expert, count in zip(*torch.unique(ids, return_counts=True), strict=True):
                m.tokens.labels(m.shard, str(decoded.layer), str(int(expert))).inc(int(count))
        return answer

    async def Forward(self, request, context):
        try:
            return await self._answer(request)
        except wire.WireError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except WeightsNotLoaded as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def ForwardStream(self, request_iterator, context):
        async for request in request_iterator:
            try:
                yield await self._answer(request)
            except wire.WireError as exc:
                yield wire.encode_stream_error_bytes(request.call_id, grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                                     str(exc))
            except WeightsNotLoaded as exc:
                yield wire.encode_stream_error_bytes(request.call_id, grpc.StatusCode.UNAVAILABLE.value[0], str(exc))

    async def Info(self, request, context):
        if self.experts is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "expert weights are still loading")
        config = self.experts.config
        return pb.InfoResponse(
            model_id=wire.model_id(config), num_layers=config.n_layers, num_experts=config.n_experts,
            hidden_size=config.d_model, dtype=wire.DTYPE_TO_WIRE[self.experts.dtype],
            device=str(self.experts.device), max_rows=self.settings.max_rows,
            shard=[pb.LayerExperts(layer=layer, expert_ids=list(ids)) for layer, ids in self.experts.shard.items()],
            resident_bytes=self.experts.resident_bytes())


def _identity(raw: bytes) -> bytes:
    return raw


def add_expert_service(servicer: ExpertServicer, server: grpc.aio.Server) -> None:
    """Like the generated add_ExpertServiceServicer_to_server, but Forward/ForwardStream answers are already
    serialized bytes (wire.encode_response_bytes), so the response serializer is the identity."""
    handlers = {
        "Forward": grpc.unary_unary_rpc_method_handler(
            servicer.Forward, request_deserializer=pb.ForwardRequest.FromString, response_serializer=_identity),
        "ForwardStream": grpc.stream_stream_rpc_method_handler(
            servicer.ForwardStream, request_deserializer=pb.ForwardRequest.FromString,
            response_serializer=_identity),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, request_deserializer=pb.InfoRequest.FromString,
            response_serializer=pb.InfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def message_limit(d_model: int, max_rows: int, experts_per_row: int) -> int:
    """Largest ForwardRequest/Response a shard can need (f32 rows + ids + gates), plus framing."""
    return max_rows * (d_model * 4 + experts_per_row * 8) + 4096


class WorkerProcess:
    """Owns the server lifecycle: bind → NOT_SERVING → load → SERVING → (signal) → NOT_SERVING → drain."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        self.ckpt = GrokserveCheckpoint(settings.checkpoint)
        config = self.ckpt.config
        limit = message_limit(config.d_model, settings.max_rows, config.n_experts_per_token)
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            *settings.extra_options])
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.metrics = WorkerMetrics(settings.shard_name) if settings.metrics_port is not None else None
        self.metrics_port: int | None = None
        self.servicer = ExpertServicer(settings, self.metrics)
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
        if self.metrics is not None:
            self.metrics_port = serve_metrics(self.metrics.registry, self.settings.host, self.settings.metrics_port,
                                              self.settings.metrics_port_span)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        experts = await asyncio.get_running_loop().run_in_executor(None, self._load)
        self.servicer.attach(experts)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def _load(self) -> ExpertModule:
        s = self.settings
        params = self.ckpt.load(self.ckpt.expert_names(s.shard), progress=f"loading experts on {self.address}")
        return ExpertModule(self.ckpt.config, s.shard, torch_dtype(s.dtype), params, s.device)

    async def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.ready.labels(self.metrics.shard).set(0)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=self.settings.drain_seconds)
