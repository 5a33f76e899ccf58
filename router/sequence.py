"""One request's state inside the router: its tokens, KV blocks, sampler, text stream and output sink."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from grokserve.model.sampling import SampledToken, SamplingParams
from grokserve.model.text_stream import TextStream


@dataclass
class StepOutput:
    """What one engine step produced for a sequence (streamed to its client)."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    tokens: list[SampledToken] = field(default_factory=list)
    # on the first output of a request that asked for them: prompt tokens 1.. with their logprobs
    prompt_logprobs: list[SampledToken] | None = None
    finish_reason: str | None = None  # length | stop | eos | cancelled
    error: Exception | None = None  # typed (router.errors, transport.errors); the service maps it to a status
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_seconds: float = 0.0
    time_to_first_token_seconds: float = 0.0
    total_seconds: float = 0.0


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    text_stream: TextStream
    sink: Callable[[StepOutput], None]  # receives this request's outputs, in order
    # the event loop `sink` must run on (the client API's); None: called directly on the engine's thread
    sink_loop: asyncio.AbstractEventLoop | None = None
    arrival: float = field(default_factory=time.monotonic)
    deadline: float = float("inf")  # time.monotonic() by which the request must have ended
    output_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[SampledToken] = field(default_factory=list)  # of prompt tokens 1, 2, … (when asked)
    index: int = 0  # which of the request's n choices this sequence is
    block_keys: list = field(default_factory=list)  # prefix-cache keys of its full blocks (router/prefix_cache.py)
    registered_blocks: int = 0  # leading blocks registered in (or taken from) the prefix cache
    blocks: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    cancelled: bool = False
    finished: bool = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def timings(self, now: float) -> dict[str, float]:
        return {
            "queue_seconds": (self.first_scheduled or now) - self.arrival,
            "time_to_first_token_seconds": (self.first_token or now) - self.arrival,
            "total_seconds": now - self.arrival,
        }
