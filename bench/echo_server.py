"""A raw-bytes gRPC echo server (unary and bidi stream), the transport floor the dispatch benchmark compares to.

Each request's first 8 bytes give the size of the reply (little-endian); the rest is payload.
Run: python bench/echo_server.py PORT
"""

from __future__ import annotations

import asyncio
import sys

import grpc

LIMIT = 256 * 1024 * 1024
_replies: dict[int, bytes] = {}


def _reply(request: bytes) -> bytes:
    size = int.from_bytes(request[:8], "little")
    if size not in _replies:
        _replies[size] = bytes(size)
    return _replies[size]


async def _unary(request: bytes, context) -> bytes:
    return _reply(request)


async def _stream(request_iterator, context):
    async for request in request_iterator:
        yield _reply(request)


async def main(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", LIMIT),
                                      ("grpc.max_send_message_length", LIMIT)])
    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(_unary),
                "Stream": grpc.stream_stream_rpc_method_handler(_stream)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo SERVING on 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
