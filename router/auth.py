"""Bearer-token authentication of the client APIs: a grpc.aio server interceptor, and `token_matches` for HTTP.

Tokens come from a file (one per line; a mounted Kubernetes Secret in the chart) and are compared in
constant time. Health and reflection stay open so probes work; anything else without a valid
`authorization: Bearer <token>` is answered UNAUTHENTICATED before the handler runs.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def load_tokens(path: str | Path) -> tuple[bytes, ...]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"tokens_file: cannot read {path} ({exc.strerror})") from None
    tokens = tuple(line.strip().encode() for line in lines if line.strip() and not line.startswith("#"))
    if not tokens:
        raise ValueError(f"tokens_file: {path} holds no token")
    return tokens


def token_matches(header: str | bytes, tokens: tuple[bytes, ...]) -> bool:
    """An `authorization` header value carries one of `tokens` as `Bearer <token>` (both APIs use this)."""
    if isinstance(header, bytes):
        header = header.decode(errors="replace")
    if not header.startswith("Bearer "):
        return False
    offered = header[len("Bearer "):].strip().encode()
    # compare against every token, always, so timing reveals neither which nor whether one matched
    matches = [hmac.compare_digest(offered, token) for token in tokens]
    return any(matches)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: tuple[bytes, ...]):
        self.tokens = tokens

    def _authorized(self, metadata) -> bool:
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        return token_matches(header, self.tokens)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_SERVICES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or invalid bearer token")

        async def deny_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authorization: missing or invalid bearer token")
            yield  # pragma: no cover - makes this an async generator

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(deny_unary, handler.request_deserializer,
                                                   handler.response_serializer)
