"""The gRPC data plane to one worker replica: unary `Forward` calls, or one persistent `ForwardStream` whose
answers are matched to waiting calls by call_id. Requests go out as pre-serialized bytes; answers are
parsed zero-copy (`wire.decode_response_bytes`).

Reconnect backoff is bounded (a worker back on the same address is reached within about a second, not
after gRPC's default exponential backoff of up to two minutes), and keepalives notice a silent peer.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import grpc

from grokserve.transport import wire
from grokserve.transport.errors import CallFailed
from grokserve.transport.tls import TlsFiles
from grokserve.v1 import expert_pb2 as pb
from grokserve.v1 import expert_pb2_grpc as pb_grpc

GrpcMode = Literal["stream", "unary"]
# Answers that say the replica cannot serve now (another replica or a later call may succeed). Everything
# else a worker answers (INVALID_ARGUMENT, FAILED_PRECONDITION, ...) refuses the message itself.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
             grpc.StatusCode.ABORTED}
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 500)]


def status_code(value: int) -> grpc.StatusCode:
    return next((code for code in grpc.StatusCode if code.value[0] == value), grpc.StatusCode.UNKNOWN)


def call_failed(code: grpc.StatusCode, detail: str) -> CallFailed:
    return CallFailed(detail, retryable=code in RETRYABLE, code=code.name)


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
        failure = call_failed(grpc.StatusCode.UNAVAILABLE, "stream closed")
        try:
            async for response in self.call:
                future = self.waiting.pop(response.call_id, None)
                if future is not None and not future.done():
                    future.set_result(response)
        except grpc.aio.AioRpcError as exc:
            failure = call_failed(exc.code(), exc.details() or str(exc))
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
            raise call_failed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:.2f}s") from None
        except grpc.aio.AioRpcError as exc:
            self.close()
            raise call_failed(exc.code(), exc.details() or str(exc)) from None
        except (asyncio.InvalidStateError, grpc.aio.UsageError):
            self.close()
            raise call_failed(grpc.StatusCode.UNAVAILABLE, "stream closed") from None
        finally:
            self.waiting.pop(call_id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a failure set by the reader after this call gave up is not news

    def close(self) -> None:
        self.broken = True
        self.call.cancel()
        self.reader.cancel()


class GrpcChannel:
    """ReplicaChannel over gRPC. Create and use it on one event loop."""

    def __init__(self, address: str, max_message_bytes: int, mode: GrpcMode = "stream", tls: TlsFiles | None = None):
        self.address = address
        self.mode = mode
        self.kind = f"grpc-{mode}"
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000), *RECONNECT_OPTIONS]
        self.channel = (grpc.aio.secure_channel(address, tls.channel_credentials(), options + tls.channel_options())
                        if tls else grpc.aio.insecure_channel(address, options=options))
        self._forward = self.channel.unary_unary(
            "/grokserve.v1.ExpertService/Forward", request_serializer=_identity,
            response_deserializer=wire.decode_response_bytes)
        self._forward_stream = self.channel.stream_stream(
            "/grokserve.v1.ExpertService/ForwardStream", request_serializer=_identity,
            response_deserializer=wire.decode_response_bytes)
        stub = pb_grpc.ExpertServiceStub(self.channel)
        self._info, self._attach = stub.Info, stub.AttachSharedMemory
        self._stream: _Stream | None = None

    async def exchange(self, call_id: int, message: wire.WireMessage, timeout: float) -> wire.ResponseView:
        request = message.tobytes()
        if self.mode == "stream":
            if self._stream is None or self._stream.broken:
                self._stream = _Stream(self._forward_stream())
            response = await self._stream.exchange(call_id, request, timeout)
        else:
            try:
                response = await self._forward(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                raise call_failed(exc.code(), exc.details() or str(exc)) from None
        if response.has_error:
            raise call_failed(status_code(response.error_code), response.error_message)
        return response

    async def info(self, timeout: float) -> pb.InfoResponse:
        try:
            return await self._info(pb.InfoRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise call_failed(exc.code(), exc.details() or str(exc)) from None

    async def attach(self, request: pb.AttachRequest, timeout: float) -> pb.AttachResponse:
        """AttachSharedMemory on this (authenticated) channel."""
        try:
            return await self._attach(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise call_failed(exc.code(), exc.details() or str(exc)) from None

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        await self.channel.close()
