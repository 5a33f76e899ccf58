"""Typed errors of the router↔worker data plane: what a failed exchange means for the requests it carried."""

from __future__ import annotations


class CallFailed(Exception):
    """One exchange with one replica failed. `retryable`: another replica (or a later call) may succeed;
    otherwise the worker refused the message itself (a router-side bug, never retried)."""

    def __init__(self, detail: str, retryable: bool = True, code: str = "UNAVAILABLE"):
        super().__init__(detail)
        self.retryable = retryable
        self.code = code  # the gRPC status name the worker answered with, or what the channel saw


class DispatchError(RuntimeError):
    """A worker refused a message as malformed: a bug on the router side, not an outage (→ INTERNAL)."""


class ShardUnavailable(RuntimeError):
    """No replica of a shard answered within the deadline (→ UNAVAILABLE for the affected requests)."""

    def __init__(self, shard: str, layer: int, detail: str):
        super().__init__(f"expert shard '{shard}' unavailable for layer {layer}: {detail}")
        self.shard = shard
        self.layer = layer


class PlacementMismatch(RuntimeError):
    """A worker's Info does not match what the router expects of it (model, dtype or the experts it holds)."""
