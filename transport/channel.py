"""The data plane to one expert worker replica, as an interface: exchange one layer's request for its
partial sums, with a deadline; ask the replica what it holds; close.

`expert.proto` is the contract every implementation carries: requests and answers are serialized
`ForwardRequest` / `ForwardResponse` bytes (`wire`). gRPC (`grpc_channel`) is the default across hosts;
shared memory (`shm_channel`) serves a router and a worker on one host. Failures are `errors.CallFailed`
(retryable or refused), never transport exceptions.
"""

from __future__ import annotations

from typing import Protocol

from grokserve.transport.wire import ResponseView, WireMessage
from grokserve.v1 import expert_pb2 as pb


class ReplicaChannel(Protocol):
    address: str  # the replica's gRPC address (its identity)
    kind: str  # the transport label on metrics and in status: "grpc-stream", "grpc-unary", "shm"

    async def exchange(self, call_id: int, request: WireMessage, timeout: float) -> ResponseView:
        """Send one ForwardRequest, return its answer (an answer carrying an in-band error is raised as
        CallFailed). The answer's `partial` may view the channel's own memory: call its `release()` when done
        with it. Raises CallFailed on any failure; never waits past `timeout` seconds."""
        ...

    async def info(self, timeout: float) -> pb.InfoResponse:
        """The replica's Info (model, dtype, shard); raises CallFailed."""
        ...

    async def close(self) -> None:
        ...
