"""The router's typed errors. Code inside raises these; the client API maps them to status codes in one
place (`service.py: status_for`), so no module below the service edge knows about gRPC codes."""

from __future__ import annotations


class RequestError(ValueError):
    """A field of a request is invalid; the message starts with the field's name (→ INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class UnsupportedRequest(RequestError):
    """A valid request this router cannot serve, e.g. text without a tokenizer (→ FAILED_PRECONDITION)."""


class QueueFull(RuntimeError):
    """The admission queue is at its bound (→ RESOURCE_EXHAUSTED)."""


class RouterShuttingDown(RuntimeError):
    """The engine is stopping; the request was not finished (→ UNAVAILABLE)."""


class RequestTimedOut(RuntimeError):
    """The request's own deadline passed inside the router, e.g. queued behind a stuck step (→ DEADLINE_EXCEEDED)."""


class SequenceFailed(RuntimeError):
    """Something that belongs to one sequence alone failed (sampling, detokenisation); the rest of its batch
    went on (→ INTERNAL)."""


class StepFailed(RuntimeError):
    """The shared forward pass of an engine step failed; its sequences end (→ INTERNAL)."""
