"""The OpenAI-compatible HTTP API of a router: FastAPI served by uvicorn on the engine's own event loop.

Routes: POST /v1/completions, POST /v1/chat/completions (streaming as server-sent events, `data: [DONE]`
last), GET /v1/models, GET /health, GET /ready, POST /tokenize, POST /detokenize. A request body becomes the
GenerateRequest a gRPC client would send (router/openai_schema.py) and goes through the same admission as
the gRPC API (`GenerationService.admit`): same validation, defaults, seeds and answers. Errors are OpenAI
error objects with the status of their typed error (`http_status`): 400 naming the field, 401 without a
valid bearer token (the gRPC API's tokens), 404 for another model's name, 413 for an oversized body, 429
when the queue is full, 503 when a shard is unavailable, 504 when the deadline passes. A client that goes
away cancels its request: its sequences leave the batch and their KV blocks are freed at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from grokserve.model.sampling import ParameterError, SampledToken
from grokserve.router.auth import token_matches
from grokserve.router.chat_template import ChatTemplate, ChatTemplateError
from grokserve.router.errors import QueueFull, RequestError, UnsupportedRequest
from grokserve.router.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from grokserve.router.sequence import Sequence, StepOutput
from grokserve.router.service import Admitted, GenerationService, status_for
from grokserve.router.validation import max_prompt_chars, request_size_limit
from grokserve.transport.tls import TlsFiles
from grokserve.v1 import generation_pb2 as gen_pb

log = logging.getLogger(__name__)
MAX_CONNECTIONS = 2048  # open HTTP connections and requests in progress; beyond it uvicorn answers 503

_HTTP_STATUS = {  # gRPC status (the typed errors' one table, service.status_for) → HTTP status, error type
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}
_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}
# proto field names that the OpenAI API calls otherwise
_PARAM = {"prompt_token_ids": "prompt", "prompt, prompt_token_ids": "prompt", "request": None}


class ApiError(Exception):
    """An HTTP error answer: status code, OpenAI error type, the offending parameter, a message."""

    def __init__(self, code: grpc.StatusCode, message: str, param: str | None = None, error_code: str | None = None):
        super().__init__(message)
        self.grpc_code = code
        self.status, self.type = _HTTP_STATUS.get(code, (500, "server_error"))
        self.param = param
        self.error_code = error_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.error_code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def api_error(exc: BaseException, logprobs_field: str = "logprobs") -> ApiError:
    """A typed error of the router (or a sampling ParameterError) as the HTTP answer it gets."""
    if isinstance(exc, ApiError):
        return exc
    field = getattr(exc, "field", None)
    field = _PARAM.get(field, field) if field is not None else None
    if field == "logprobs":
        field = logprobs_field
    return ApiError(status_for(exc), str(exc), field)


class BodyLimit:
    """ASGI middleware: request bodies above `limit` bytes get 413 before they are read into memory."""

    def __init__(self, app: Any, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counted_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Callable) -> None:
        body = json.dumps({"error": {"message": f"request: the body exceeds {self.limit} bytes",
                                     "type": "invalid_request_error", "param": None, "code": "body_too_large"}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


class _TooLarge(Exception):
    pass


class HttpApi:
    """The routes over one GenerationService (the router's engine, tokenizer and model)."""

    def __init__(self, service: GenerationService, tokens: tuple[bytes, ...] | None = None,
                 chat_template: ChatTemplate | None = None, served_model_name: str | None = None):
        self.service = service
        self.engine = service.engine
        self.config = service.config
        self.tokenizer = service.tokenizer
        self.tokens = tokens
        self.chat_template = chat_template or ChatTemplate()
        self.model_name = served_model_name or self.config.name
        self.created = int(time.time())
        self.app = self._build()

    # ---- the app ---------------------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(title="grokserve", docs_url=None, redoc_url=None, openapi_url=None)
        auth = [Depends(self._authorize)]

        @app.exception_handler(ApiError)
        async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
            return exc.response()

        @app.exception_handler(RequestValidationError)
        async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
            first = exc.errors()[0] if exc.errors() else {}
            loc = [str(part) for part in first.get("loc", ()) if part != "body"]
            param = ".".join(loc) or None
            message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
            return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message, param).response()

        @app.exception_handler(404)
        async def on_not_found(request: Request, exc: Exception) -> JSONResponse:
            return ApiError(grpc.StatusCode.NOT_FOUND, f"no route {request.method} {request.url.path}",
                            None, "not_found").response()

        app.get("/health")(self.health)
        app.get("/ready")(self.ready)
        app.get("/v1/models", dependencies=auth)(self.models)
        app.post("/v1/completions", dependencies=auth)(self.completions)
        app.post("/v1/chat/completions", dependencies=auth)(self.chat_completions)
        app.post("/tokenize", dependencies=auth)(self.tokenize)
        app.post("/detokenize", dependencies=auth)(self.detokenize)
        return app

    def asgi(self) -> Any:
        """The app with the body-size bound in front of it."""
        return BodyLimit(self.app, request_size_limit(self.config) * 2)

    async def _authorize(self, request: Request) -> None:
        if self.tokens and not token_matches(request.headers.get("authorization", ""), self.tokens):
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or invalid bearer token",
                           None, "invalid_api_key")

    # ---- probes and metadata ---------------------------------------------------------------------

    async def health(self) -> JSONResponse:
        if not self.engine.is_alive():
            return JSONResponse({"status": "unhealthy", "reason": self.engine.failure()}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def ready(self) -> JSONResponse:
        load = self.engine.load()
        if not self.engine.is_alive():
            return JSONResponse({"status": "not ready", "reason": self.engine.failure()}, status_code=503)
        return JSONResponse({"status": "ready", "waiting": load["waiting"], "running": load["running"]})

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created, "owned_by": "grokserve",
            "root": self.service.model_id, "max_model_len": self.config.max_seq_len}]}

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        tokenizer = self._need_tokenizer("prompt")
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "prompt, messages: give one of them", "prompt")
        text = body.prompt if body.prompt is not None else self._render_chat(body.messages or [], True)
        self._check_text_length(text, "prompt")
        ids = tokenizer.encode(text)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.config.max_seq_len}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        tokenizer = self._need_tokenizer("tokens")
        if len(body.tokens) > self.config.max_seq_len:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"tokens: at most {self.config.max_seq_len}",
                           "tokens")
        bad = next((t for t in body.tokens if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"tokens: {bad} is outside the vocabulary [0, {self.config.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    # ---- completions -----------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        self._check_model(body)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        logprobs = body.logprobs
        protos = []
        for prompt in body.prompts():
            try:
                proto = body.to_proto(request_id)
            except RequestError as exc:
                raise api_error(exc) from None
            if isinstance(prompt, str):
                proto.prompt = prompt
            else:
                if not prompt or not all(isinstance(t, int) and 0 <= t < 2**32 for t in prompt):
                    raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "prompt: token-id prompts must be non-empty lists of ids in the vocabulary",
                                   "prompt")
                proto.prompt_token_ids.extend(prompt)
            if logprobs is not None:
                if logprobs < 0:
                    raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"logprobs: must be ≥ 0, got {logprobs}",
                                   "logprobs")
                proto.logprobs = logprobs
                if body.echo:
                    proto.prompt_logprobs = logprobs
            protos.append(proto)
        runs = self._admit_all(protos, "logprobs")
        call = _Completion(self, runs, request_id, body, chat=False)
        return await call.respond(request)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        self._check_model(body)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        tokenizer = self._need_tokenizer("messages")
        text = self._render_chat(body.messages, body.add_generation_prompt)
        self._check_text_length(text, "messages")
        ids = tokenizer.encode(text)
        if not ids:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "messages: render to no tokens", "messages")
        try:
            proto = body.to_proto(request_id)
        except RequestError as exc:
            raise api_error(exc) from None
        proto.prompt_token_ids.extend(ids)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:  # OpenAI's chat default: as much as fits
            limits = self.engine.limits
            max_tokens = max(1, min(limits.max_tokens_limit, self.config.max_seq_len - len(ids),
                                    self.engine.capacity_tokens - len(ids)))
        proto.max_tokens = max_tokens
        proto.stop.extend([s for s in self.chat_template.stop if s not in proto.stop])
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs: needs logprobs: true",
                               "top_logprobs")
            if body.top_logprobs < 0:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "top_logprobs: must be ≥ 0", "top_logprobs")
            proto.logprobs = body.top_logprobs
        runs = self._admit_all([proto], "top_logprobs")
        call = _Completion(self, runs, request_id, body, chat=True)
        return await call.respond(request)

    # ---- helpers ---------------------------------------------------------------------------------

    def _admit_all(self, protos: list[gen_pb.GenerateRequest], logprobs_field: str) -> list[Admitted]:
        """Admit every prompt's request, or none: a refusal of one cancels those admitted before it."""
        deadline = time.monotonic() + self.engine.limits.request_timeout_s
        runs: list[Admitted] = []
        try:
            for proto in protos:
                runs.append(self.service.admit(proto, deadline, "http"))
        except (RequestError, ParameterError, QueueFull) as exc:
            for run in runs:
                run.end(grpc.StatusCode.CANCELLED, "cancelled")
            raise api_error(exc, logprobs_field) from None
        return runs

    def _check_model(self, body: SamplingFields) -> None:
        if body.model not in (self.model_name, self.service.model_id):
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"model: this router serves '{self.model_name}', "
                                                      f"not '{body.model}'", "model", "model_not_found")

    def _need_tokenizer(self, field: str) -> Any:
        if self.tokenizer is None:
            raise api_error(UnsupportedRequest(field, "this model has no tokenizer; send token ids"))
        return self.tokenizer

    def _check_text_length(self, text: str, field: str) -> None:
        if len(text) > max_prompt_chars(self.config):
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{field}: {len(text)} characters cannot fit the context of {self.config.max_seq_len} "
                           f"tokens", field)

    def _render_chat(self, messages: list, add_generation_prompt: bool) -> str:
        plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        try:
            return self.chat_template.render(plain, add_generation_prompt)
        except ChatTemplateError as exc:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"messages: {exc}", "messages") from None

    def token_text(self, token_id: int) -> str:
        """A token as OpenAI's logprobs show it: its piece with SentencePiece's word marker as a space."""
        return self.tokenizer.id_to_piece(token_id).replace("\u2581", " ") if self.tokenizer else str(token_id)


class _Completion:
    """One completions or chat request in flight: its admitted runs (one per prompt, n choices each) and the
    answer, whole or streamed."""

    def __init__(self, api: HttpApi, runs: list[Admitted], request_id: str, body: SamplingFields, chat: bool):
        self.api = api
        self.runs = runs
        self.request_id = request_id
        self.body = body
        self.chat = chat
        self.n = body.n
        self.created = int(time.time())
        self.echo = bool(getattr(body, "echo", False))
        self.want_logprobs = bool(body.logprobs) if chat else body.logprobs is not None  # type: ignore[attr-defined]
        self.codes: dict[int, grpc.StatusCode] = {}
        self.reasons: dict[int, str] = {}

    async def respond(self, request: Request) -> Any:
        if self.body.stream:
            return EventSourceResponse(self._events(), ping=15, send_timeout=30)
        collect = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if collect in done:
                return collect.result()
            self._end_all(grpc.StatusCode.CANCELLED, "cancelled")  # the client went away: its sequences leave
            collect.cancel()  # the batch at the next step
            with contextlib.suppress(asyncio.CancelledError, ApiError):
                await collect
            return JSONResponse({}, status_code=499)
        finally:
            gone.cancel()
            self._end_all(grpc.StatusCode.CANCELLED, "cancelled")

    # ---- running -------------------------------------------------------------------------------

    async def _merged(self) -> AsyncIterator[tuple[int, Sequence, StepOutput]]:
        """(prompt number, sequence, output) of every run as they come; a failure is raised as an ApiError."""
        if len(self.runs) == 1:
            try:
                async for seq, out in self.runs[0].outputs():
                    yield 0, seq, out
            except ApiError:
                raise
            except Exception as exc:
                self._end(0, exc)
                raise api_error(exc) from None
            return
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)  # each run's own queue holds the rest

        async def pump(number: int, run: Admitted) -> None:
            try:
                async for seq, out in run.outputs():
                    await queue.put((number, seq, out, None))
            except Exception as exc:
                await queue.put((number, None, None, exc))
            await queue.put((number, None, None, StopAsyncIteration()))

        tasks = [asyncio.ensure_future(pump(i, run)) for i, run in enumerate(self.runs)]
        try:
            running = len(tasks)
            while running:
                number, seq, out, failure = await queue.get()
                if isinstance(failure, StopAsyncIteration):
                    running -= 1
                elif failure is not None:
                    self._end(number, failure)
                    raise api_error(failure)
                else:
                    yield number, seq, out
        finally:
            for task in tasks:
                task.cancel()

    def _end(self, number: int, exc: BaseException) -> None:
        code = status_for(exc)
        self.runs[number].end(code, "cancelled" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "error")

    def _end_all(self, code: grpc.StatusCode, reason: str) -> None:
        """Count each run once: those that finished with OK and their reason, the rest with `code`."""
        for number, run in enumerate(self.runs):
            if number in self.reasons:
                run.end(grpc.StatusCode.OK, self.reasons[number])
            else:
                run.end(code, reason)

    def _index(self, number: int, seq: Sequence) -> int:
        return number * self.n + seq.index

    def _note_finish(self, number: int, out: StepOutput, finished: dict[int, int]) -> None:
        if out.finish_reason is not None:
            finished[number] = finished.get(number, 0) + 1
            if finished[number] == self.n:
                self.reasons[number] = out.finish_reason

    async def _collect(self) -> dict[str, Any]:
        choices: dict[int, dict[str, Any]] = {}
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        finished: dict[int, int] = {}
        async for number, seq, out in self._merged():
            index = self._index(number, seq)
            choice = choices.setdefault(index, {"text": "", "tokens": [], "prompt": None, "finish": None,
                                                "seq": seq})
            if out.prompt_logprobs is not None:
                choice["prompt"] = out.prompt_logprobs
            choice["text"] += out.text
            choice["tokens"].extend(out.tokens)
            if out.finish_reason is not None:
                choice["finish"] = out.finish_reason
                prompt_tokens[number] = out.prompt_tokens
                completion_tokens += out.completion_tokens
            self._note_finish(number, out, finished)
        usage = self._usage(sum(prompt_tokens.values()), completion_tokens)
        ordered = [choices[i] for i in sorted(choices)]
        if self.chat:
            return {"id": self.request_id, "object": "chat.completion", "created": self.created,
                    "model": self.api.model_name, "usage": usage,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": c["text"]},
                                 "logprobs": self._chat_logprobs(c["tokens"]) if self.want_logprobs else None,
                                 "finish_reason": _FINISH[c["finish"]]} for i, c in zip(sorted(choices), ordered,
                                                                                        strict=True)]}
        return {"id": self.request_id, "object": "text_completion", "created": self.created,
                "model": self.api.model_name, "usage": usage,
                "choices": [{"index": i, "text": self._echoed(c["seq"]) + c["text"],
                             "logprobs": self._completion_logprobs(c["seq"], c["prompt"], c["tokens"])
                             if self.want_logprobs else None,
                             "finish_reason": _FINISH[c["finish"]]} for i, c in zip(sorted(choices), ordered,
                                                                                    strict=True)]}

    async def _events(self) -> AsyncIterator[dict[str, str]]:
        prompt_tokens: dict[int, int] = {}
        completion_tokens = 0
        finished: dict[int, int] = {}
        started: set[int] = set()
        try:
            async for number, seq, out in self._merged():
                index = self._index(number, seq)
                first = index not in started
                started.add(index)
                if out.finish_reason is not None:
                    prompt_tokens[number] = out.prompt_tokens
                    completion_tokens += out.completion_tokens
                self._note_finish(number, out, finished)
                yield {"data": json.dumps(self._chunk(index, seq, out, first), separators=(",", ":"))}
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                usage = self._usage(sum(prompt_tokens.values()), completion_tokens)
                yield {"data": json.dumps({"id": self.request_id, "object": self._chunk_object(),
                                           "created": self.created, "model": self.api.model_name, "choices": [],
                                           "usage": usage}, separators=(",", ":"))}
            yield {"data": "[DONE]"}
            self._end_all(grpc.StatusCode.CANCELLED, "cancelled")
        except ApiError as exc:  # after the 200 went out: the error travels as an event, then the stream ends
            yield {"data": json.dumps(exc.body(), separators=(",", ":"))}
            self._end_all(exc.grpc_code, "error")
        finally:  # also when the client went away (sse-starlette cancels this generator)
            self._end_all(grpc.StatusCode.CANCELLED, "cancelled")

    # ---- formatting ----------------------------------------------------------------------------

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _chunk(self, index: int, seq: Sequence, out: StepOutput, first: bool) -> dict[str, Any]:
        finish = _FINISH[out.finish_reason] if out.finish_reason is not None else None
        if self.chat:
            delta: dict[str, Any] = {"content": out.text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": index, "delta": delta, "finish_reason": finish,
                      "logprobs": self._chat_logprobs(out.tokens) if self.want_logprobs else None}
        else:
            text = (self._echoed(seq) if first else "") + out.text
            logprobs = None
            if self.want_logprobs:
                logprobs = self._completion_logprobs(seq, out.prompt_logprobs if first and self.echo else None,
                                                     out.tokens, with_prompt=first)
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"id": self.request_id, "object": self._chunk_object(), "created": self.created,
                "model": self.api.model_name, "choices": [choice]}

    def _echoed(self, seq: Sequence) -> str:
        if not self.echo:
            return ""
        tokenizer = self.api.tokenizer
        return tokenizer.decode(seq.prompt_ids) if tokenizer else ""

    @staticmethod
    def _usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _completion_logprobs(self, seq: Sequence, prompt: list[SampledToken] | None, tokens: list[SampledToken],
                             with_prompt: bool = True) -> dict[str, Any]:
        """OpenAI's completions logprobs object; with echo, the prompt's tokens first (the first one has none)."""
        texts: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        if self.echo and with_prompt:
            texts.append(self.api.token_text(seq.prompt_ids[0]))
            values.append(None)
            tops.append(None)
            for token in prompt or []:
                texts.append(self.api.token_text(token.token_id))
                values.append(token.logprob)
                tops.append({self.api.token_text(t): lp for t, lp in token.top_logprobs})
        for token in tokens:
            texts.append(self.api.token_text(token.token_id))
            values.append(token.logprob)
            tops.append({self.api.token_text(t): lp for t, lp in token.top_logprobs})
        offsets, at = [], 0
        for text in texts:
            offsets.append(at)
            at += len(text)
        return {"tokens": texts, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, tokens: list[SampledToken]) -> dict[str, Any]:
        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            text = self.api.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(t.token_id, t.logprob),
                             "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]} for t in tokens]}


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: the next message is that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def start_http_server(api: HttpApi, host: str, port: int, tls: TlsFiles | None = None
                            ) -> tuple[uvicorn.Server, int, asyncio.Task]:
    """Serve `api` on the running loop (the engine's); returns the server, its bound port and its task. The
    socket is bound with SO_REUSEPORT, as gRPC's, so router replicas on one node share the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    # accepted connections inherit it: without it a stream's small writes on a kept-alive connection wait for
    # the client's delayed ACK (~40 ms on Linux) under Nagle's algorithm (bench/load.py measured 44 ms TTFT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"http_port: could not bind {host}:{port} ({exc.strerror})") from None
    bound = sock.getsockname()[1]
    config = uvicorn.Config(api.asgi(), host=host, port=bound, log_level="warning", lifespan="off",
                            access_log=False, timeout_graceful_shutdown=10, limit_concurrency=MAX_CONNECTIONS,
                            ssl_certfile=tls.cert_file if tls else None, ssl_keyfile=tls.key_file if tls else None)
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="router-http")
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError(f"the HTTP server on {host}:{bound} stopped while starting")
        await asyncio.sleep(0.01)
    return server, bound, task


async def stop_http_server(server: uvicorn.Server, task: asyncio.Task) -> None:
    """Stop accepting, let requests in progress finish (uvicorn's graceful shutdown, ≤ 10 s)."""
    server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(task, 15)


def chat_template_from(path: str | None, stop: list[str] | None) -> ChatTemplate:
    """The router's chat template: the file's (with `stop`), or the default (with its stop strings unless
    `stop` is given)."""
    if path:
        return ChatTemplate.from_file(path, tuple(stop or ()))
    return ChatTemplate() if stop is None else ChatTemplate(stop=tuple(stop))

