"""The client-facing `Generation` gRPC service (grpc.aio), with health and server reflection.

Each call: validate → a Sequence submitted to the engine → outputs streamed back as they come. A client
deadline or cancel removes the sequence from the batch at the next step; engine errors map to status
codes here, in one place.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from grokserve.model.sampling import make_generator
from grokserve.model.text_stream import TextStream
from grokserve.model.tokenizer import Tokenizer
from grokserve.router.auth import BearerTokenInterceptor
from grokserve.router.engine import RouterEngine
from grokserve.router.scheduler import QueueFull
from grokserve.router.sequence import Sequence, StepOutput
from grokserve.router.validation import RequestError, max_prompt_chars, request_size_limit, validate_request
from grokserve.v1 import generation_pb2 as gen_pb
from grokserve.v1 import generation_pb2_grpc as gen_grpc
from grokserve.workers.tls import TlsFiles

log = logging.getLogger("grokserve.router")
SERVICE_NAME = "grokserve.v1.Generation"
_FINISH = {"length": gen_pb.FINISH_REASON_LENGTH, "stop": gen_pb.FINISH_REASON_STOP, "eos": gen_pb.FINISH_REASON_EOS,
           "cancelled": gen_pb.FINISH_REASON_CANCELLED}


class GenerationService(gen_grpc.GenerationServicer):
    def __init__(self, engine: RouterEngine, tokenizer: Tokenizer | None, model_id: str,
                 shards: dict[str, str] | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.shards = shards or {}
        self.config = engine.config

    # ---- admission -------------------------------------------------------------------------------

    def _admit(self, request: gen_pb.GenerateRequest) -> tuple[Sequence, asyncio.Queue]:
        valid = validate_request(request, self.config, self.tokenizer, self.engine.limits.max_tokens_limit,
                                 self.engine.capacity_tokens)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[StepOutput] = asyncio.Queue(maxsize=valid.params.max_tokens + 2)  # one per token
        detok = self.tokenizer.detokenizer(valid.prompt_ids) if self.tokenizer else None
        seq = Sequence(
            request_id=valid.request_id, prompt_ids=valid.prompt_ids, params=valid.params,
            generator=make_generator(valid.params.seed), text=TextStream(detok, valid.params.stop),
            sink=lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        self.engine.submit(seq)  # QueueFull → RESOURCE_EXHAUSTED
        return seq, outputs

    def _count(self, code: grpc.StatusCode) -> None:
        if self.engine.metrics is not None:
            self.engine.metrics.request_status.labels(code.name).inc()

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str):
        self._count(code)
        await context.abort(code, message)

    async def _outputs(self, request: gen_pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Yield (seq, StepOutput) until the last one; map every failure to a status code."""
        try:
            seq, outputs = self._admit(request)
        except RequestError as exc:
            await self._abort(context, exc.code, str(exc))
        except QueueFull as exc:
            await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            while True:
                out = await outputs.get()
                if out.error is not None:
                    code, message = out.error
                    await self._abort(context, getattr(grpc.StatusCode, code), message)
                yield seq, out
                if out.finish_reason is not None:
                    self._count(grpc.StatusCode.OK)
                    return
        except asyncio.CancelledError:  # the client went away or its deadline passed
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            self._count(grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED)
            raise
        finally:
            if not seq.finished:  # deadline, client cancel, or the stream consumer went away
                self.engine.cancel(seq)

    # ---- RPCs ------------------------------------------------------------------------------------

    async def Generate(self, request, context):
        response = gen_pb.GenerateResponse()
        async for seq, out in self._outputs(request, context):
            response.request_id = seq.request_id
            self._append(response, out)
        return response

    async def GenerateStream(self, request, context):
        async for seq, out in self._outputs(request, context):
            response = gen_pb.GenerateResponse(request_id=seq.request_id)
            self._append(response, out)
            yield response

    async def Tokenize(self, request, context):
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "text: this model has no tokenizer")
        if len(request.text) > max_prompt_chars(self.config):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "text: too long")
        return gen_pb.TokenizeResponse(token_ids=self.tokenizer.encode(request.text))

    async def GetModelInfo(self, request, context):
        c = self.config
        return gen_pb.ModelInfoResponse(
            model_id=self.model_id, vocab_size=c.vocab_size, context_length=c.max_seq_len,
            max_tokens_limit=self.engine.limits.max_tokens_limit, has_tokenizer=self.tokenizer is not None,
            dtype=str(self.engine.model.dense.dtype).removeprefix("torch."), num_layers=c.n_layers,
            num_experts=c.n_experts, experts_per_token=c.n_experts_per_token, shards=self.shards,
            eos_token_id=c.eos_id)

    def _append(self, response: gen_pb.GenerateResponse, out: StepOutput) -> None:
        response.text += out.text
        response.token_ids.extend(out.token_ids)
        for token in out.tokens:
            entry = response.logprobs.add()
            entry.sampled.token_id, entry.sampled.logprob = token.token_id, token.logprob
            entry.sampled.piece = self._piece(token.token_id)
            for token_id, logprob in token.top_logprobs:
                entry.top.add(token_id=token_id, logprob=logprob, piece=self._piece(token_id))
        if out.finish_reason is not None:
            response.finish_reason = _FINISH[out.finish_reason]
            response.usage.prompt_tokens = out.prompt_tokens
            response.usage.completion_tokens = out.completion_tokens
            response.timings.queue_seconds = out.queue_seconds
            response.timings.time_to_first_token_seconds = out.time_to_first_token_seconds
            response.timings.total_seconds = out.total_seconds

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.id_to_piece(token_id) if self.tokenizer else ""


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
    gen_grpc.add_GenerationServicer_to_server(service, server)
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
    server.health = health  # type: ignore[attr-defined]  # kept so shutdown can flip it
    return server, bound
