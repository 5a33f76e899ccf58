"""The client-facing `Generation` gRPC service (grpc.aio), with health and server reflection. It runs on the
engine's event loop (router/engine.py), so outputs reach the handlers without a thread hop.

Each call: parse (undecodable bytes → INVALID_ARGUMENT) → validate → the request's n Sequences submitted to
the engine (`GenerationService.admit`, shared with the HTTP API in router/http_api.py) → outputs streamed
back as they come, until the request's deadline (the client's, or the router's default). A client deadline
or cancel removes the sequences from the batch at the next step. This is the edge where typed errors
become status codes, in one table (`status_for`), and where each request is counted once (`Admitted.end`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from grokserve.model.dtypes import dtype_name
from grokserve.model.sampling import ParameterError, SampledToken, make_generator
from grokserve.model.text_stream import TextStream
from grokserve.model.tokenizer import Tokenizer
from grokserve.router.auth import BearerTokenInterceptor
from grokserve.router.engine import RouterEngine
from grokserve.router.errors import (
    QueueFull,
    RequestError,
    RequestTimedOut,
    RouterShuttingDown,
    SequenceFailed,
    StepFailed,
    UnsupportedRequest,
)
from grokserve.router.sequence import Sequence, StepOutput
from grokserve.router.validation import max_prompt_chars, request_size_limit, validate_request
from grokserve.transport.errors import DispatchError, PlacementMismatch, ShardUnavailable
from grokserve.transport.tls import TlsFiles
from grokserve.v1 import generation_pb2 as gen_pb

log = logging.getLogger(__name__)
SERVICE_NAME = "grokserve.v1.Generation"
CLIENT_DEADLINE_GRACE_S = 0.25
_FINISH = {"length": gen_pb.FINISH_REASON_LENGTH, "stop": gen_pb.FINISH_REASON_STOP, "eos": gen_pb.FINISH_REASON_EOS,
           "cancelled": gen_pb.FINISH_REASON_CANCELLED}

# Typed errors → status codes: the only such table of the client API (first match wins).
_STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (UnsupportedRequest, grpc.StatusCode.FAILED_PRECONDITION),
    (RequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (ParameterError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (RequestTimedOut, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShardUnavailable, grpc.StatusCode.UNAVAILABLE),
    (PlacementMismatch, grpc.StatusCode.UNAVAILABLE),
    (RouterShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (DispatchError, grpc.StatusCode.INTERNAL),
    (SequenceFailed, grpc.StatusCode.INTERNAL),
    (StepFailed, grpc.StatusCode.INTERNAL),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    return next((code for kind, code in _STATUS if isinstance(error, kind)), grpc.StatusCode.INTERNAL)


class _Aborted(Exception):
    """Internal: end this RPC with `code` (raised inside the handler, turned into context.abort once)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class Admitted:
    """One admitted request: its n sequences (one per choice) and the queue their outputs arrive on."""

    def __init__(self, service: GenerationService, seqs: list[Sequence], outputs: asyncio.Queue, deadline: float,
                 api: str):
        self.service = service
        self.seqs = seqs
        self.queue = outputs
        self.deadline = deadline
        self.api = api
        self.arrival = time.monotonic()
        self._ended = False

    @property
    def request_id(self) -> str:
        return self.seqs[0].request_id

    async def outputs(self) -> AsyncIterator[tuple[Sequence, StepOutput]]:
        """(sequence, output) as the engine produces them, until every choice has finished. A failure is
        raised as its typed error (RequestTimedOut when the deadline passes first)."""
        pending = len(self.seqs)
        while pending:
            try:  # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
                # arrives as the queue yields an item, and a cancelled request would then run to its end
                async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                    index, out = await self.queue.get()
            except TimeoutError:
                raise RequestTimedOut(f"request did not finish within its deadline "
                                      f"({self.deadline - self.arrival:.1f}s)") from None
            if out.error is not None:
                raise out.error
            yield self.seqs[index], out
            self.service.engine.output_written()
            pending -= out.finish_reason is not None

    def end(self, code: grpc.StatusCode, reason: str) -> None:
        """Count the request once (status code, finish reason, API) and cancel what has not finished."""
        if self._ended:
            return
        self._ended = True
        metrics = self.service.metrics
        metrics.request_status.labels(code.name, self.api).inc()
        metrics.requests.labels(reason, self.api).inc()
        for seq in self.seqs:
            if not seq.finished:  # deadline, client cancel, an error, or the consumer went away
                self.service.engine.cancel(seq)


class GenerationService:
    def __init__(self, engine: RouterEngine, tokenizer: Tokenizer | None, model_id: str,
                 shards: dict[str, str] | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.shards = shards or {}
        self.config = engine.config
        self.metrics = engine.metrics

    # ---- admission (both APIs) -------------------------------------------------------------------

    def admit(self, request: gen_pb.GenerateRequest, deadline: float, api: str) -> Admitted:
        """Validate and queue a request (raises RequestError, ParameterError or QueueFull, counted here)."""
        try:
            valid = validate_request(request, self.config, self.tokenizer, self.engine.limits.max_tokens_limit,
                                     self.engine.capacity_tokens)
            loop = asyncio.get_running_loop()
            # one slot per token of every choice, and its last message
            outputs: asyncio.Queue[tuple[int, StepOutput]] = asyncio.Queue(
                maxsize=valid.n * (valid.params.max_tokens + 2))
            seqs = []
            for index in range(valid.n):
                params = valid.choice_params(index)
                detok = self.tokenizer.detokenizer(valid.prompt_ids) if self.tokenizer else None
                seqs.append(Sequence(
                    request_id=valid.request_id, prompt_ids=valid.prompt_ids, params=params,
                    generator=make_generator(params.seed), text_stream=TextStream(detok, params.stop),
                    sink=functools.partial(_put, outputs, index), sink_loop=loop, deadline=deadline, index=index))
            self.engine.submit(*seqs)
        except (RequestError, ParameterError, QueueFull) as exc:
            self.metrics.request_status.labels(status_for(exc).name, api).inc()
            raise
        return Admitted(self, seqs, outputs, deadline, api)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        """time.monotonic() by which the request must end: the router's limit, or the client's deadline when
        that is sooner (plus a moment, so that gRPC's own deadline ends such a call first)."""
        remaining = context.time_remaining()
        limit = self.engine.limits.request_timeout_s
        return time.monotonic() + (limit if remaining is None else min(remaining + CLIENT_DEADLINE_GRACE_S, limit))

    async def _outputs(self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[tuple[Sequence, StepOutput]]:
        """Yield (seq, StepOutput) until the last one; count the request once, whatever ends it."""
        code, reason, run = grpc.StatusCode.OK, "error", None
        try:
            try:
                run = self.admit(request, self._deadline(context), "grpc")
            except (RequestError, ParameterError, QueueFull) as exc:
                await context.abort(status_for(exc), str(exc))
            assert run is not None
            try:
                async for seq, out in run.outputs():
                    yield seq, out
                    reason = out.finish_reason or reason
            except Exception as exc:  # the typed failure of this request
                raise _Aborted(status_for(exc), str(exc)) from None
        except _Aborted as aborted:
            code = aborted.code
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
                log.warning("request %s failed (%s): %s", run.request_id if run else "?", code.name, aborted)
            reason = "cancelled" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "error"
            await context.abort(aborted.code, str(aborted))
        except (asyncio.CancelledError, GeneratorExit):  # the client went away or its deadline passed
            remaining = context.time_remaining()
            code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0
                    else grpc.StatusCode.CANCELLED)
            reason = "cancelled"
            raise
        finally:
            if run is not None:
                run.end(code, reason)

    # ---- RPCs ------------------------------------------------------------------------------------

    async def Generate(self, request: gen_pb.GenerateRequest, context) -> gen_pb.GenerateResponse:
        choices: dict[int, gen_pb.GenerateResponse] = {}
        async for seq, out in self._outputs(request, context):
            choice = choices.setdefault(seq.index, gen_pb.GenerateResponse(request_id=seq.request_id, index=seq.index))
            self._append(choice, out)
        response = gen_pb.GenerateResponse()
        response.CopyFrom(choices[0])
        if len(choices) > 1:
            response.choices.extend(choices[i] for i in sorted(choices))
        return response

    async def GenerateStream(self, request: gen_pb.GenerateRequest, context
                             ) -> AsyncIterator[gen_pb.GenerateResponse]:
        async for seq, out in self._outputs(request, context):
            response = gen_pb.GenerateResponse(request_id=seq.request_id, index=seq.index)
            self._append(response, out)
            yield response

    async def Tokenize(self, request: gen_pb.TokenizeRequest, context) -> gen_pb.TokenizeResponse:
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "text: this model has no tokenizer")
        assert self.tokenizer is not None
        if len(request.text) > max_prompt_chars(self.config):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text: too long")
        return gen_pb.TokenizeResponse(token_ids=self.tokenizer.encode(request.text))

    async def GetModelInfo(self, request: gen_pb.ModelInfoRequest, context) -> gen_pb.ModelInfoResponse:
        c = self.config
        return gen_pb.ModelInfoResponse(
            model_id=self.model_id, vocab_size=c.vocab_size, context_length=c.max_seq_len,
            max_tokens_limit=self.engine.limits.max_tokens_limit, has_tokenizer=self.tokenizer is not None,
            dtype=dtype_name(self.engine.model.dense.dtype), num_layers=c.n_layers,
            num_experts=c.n_experts, experts_per_token=c.n_experts_per_token, shards=self.shards,
            eos_token_id=c.eos_id)

    def _append(self, response: gen_pb.GenerateResponse, out: StepOutput) -> None:
        response.text += out.text
        response.token_ids.extend(out.token_ids)
        for token in out.tokens:
            self._logprob_entry(response.logprobs.add(), token)
        for token in out.prompt_logprobs or ():
            self._logprob_entry(response.prompt_logprobs.add(), token)
        if out.finish_reason is not None:
            response.finish_reason = _FINISH[out.finish_reason]
            response.usage.prompt_tokens = out.prompt_tokens
            response.usage.completion_tokens = out.completion_tokens
            response.timings.queue_seconds = out.queue_seconds
            response.timings.time_to_first_token_seconds = out.time_to_first_token_seconds
            response.timings.total_seconds = out.total_seconds

    def _logprob_entry(self, entry: gen_pb.TokenLogprobs, token: SampledToken) -> None:
        entry.sampled.token_id, entry.sampled.logprob = token.token_id, token.logprob
        entry.sampled.piece = self._piece(token.token_id)
        for token_id, logprob in token.top_logprobs:
            entry.top.add(token_id=token_id, logprob=logprob, piece=self._piece(token_id))

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_piece(token_id) if self.tokenizer else ""


def _put(queue: asyncio.Queue, index: int, output: StepOutput) -> None:
    queue.put_nowait((index, output))


# ---- registration: requests arrive as bytes and are parsed here, so that undecodable messages (truncated,
# garbage, invalid UTF-8 in a string field) get INVALID_ARGUMENT naming the RPC instead of gRPC's UNKNOWN.

def _raw(data: bytes) -> bytes:
    return data


def _parse(message_type: type[Message], rpc: str, data: bytes) -> Message | str:
    """The parsed message, or an error text naming the RPC and, when protobuf says it, the field."""
    try:
        return message_type.FromString(data)
    except (DecodeError, UnicodeDecodeError, ValueError) as exc:
        return f"request: undecodable {message_type.DESCRIPTOR.name} for {rpc} ({exc})"


def _unary(handler: Callable, message_type: type[Message], rpc: str) -> Callable:
    async def parse_then_call(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        parsed = _parse(message_type, rpc, data)
        if isinstance(parsed, str):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, parsed)
        return await handler(parsed, context)

    return parse_then_call


def _server_streaming(handler: Callable, message_type: type[Message], rpc: str) -> Callable:
    async def parse_then_stream(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        parsed = _parse(message_type, rpc, data)
        if isinstance(parsed, str):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, parsed)
        async for item in handler(parsed, context):
            yield item

    return parse_then_stream


def add_generation_service(service: GenerationService, server: grpc.aio.Server) -> None:
    """Register the Generation RPCs (same names and messages as generation.proto's generated code)."""
    serialize = gen_pb.GenerateResponse.SerializeToString
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(
            _unary(service.Generate, gen_pb.GenerateRequest, "Generate"), request_deserializer=_raw,
            response_serializer=serialize),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            _server_streaming(service.GenerateStream, gen_pb.GenerateRequest, "GenerateStream"),
            request_deserializer=_raw, response_serializer=serialize),
        "Tokenize": grpc.unary_unary_rpc_method_handler(
            _unary(service.Tokenize, gen_pb.TokenizeRequest, "Tokenize"), request_deserializer=_raw,
            response_serializer=gen_pb.TokenizeResponse.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            _unary(service.GetModelInfo, gen_pb.ModelInfoRequest, "GetModelInfo"), request_deserializer=_raw,
            response_serializer=gen_pb.ModelInfoResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def server_options(service: GenerationService) -> list[tuple[str, int]]:
    """Message limits from the model's sizes (not gRPC's defaults). Requests over the model-derived limit but
    under the transport cap get INVALID_ARGUMENT naming `request`; beyond the cap gRPC itself answers
    RESOURCE_EXHAUSTED without reading the message."""
    limit = request_size_limit(service.config)
    return [("grpc.max_receive_message_length", max(8 * limit, 4 << 20)), ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_concurrent_streams", 1024), ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000), ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_connection_idle_ms", 600_000)]


async def start_router_server(service: GenerationService, host: str, port: int, tls: TlsFiles | None = None,
                              tokens: tuple[bytes, ...] | None = None) -> tuple[grpc.aio.Server, int]:
    """The client API server: TLS when `tls` is given, bearer-token auth when `tokens` are (health and
    reflection stay open for probes)."""
    interceptors = [BearerTokenInterceptor(tokens)] if tokens else []
    server = grpc.aio.server(options=server_options(service), interceptors=interceptors)
    add_generation_service(service, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    bound = (server.add_secure_port(f"{host}:{port}", tls.server_credentials()) if tls
             else server.add_insecure_port(f"{host}:{port}"))
    if bound == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    server.health = health  # kept so shutdown can flip it
    return server, bound
