"""The router's settings: one pydantic model per concern, the only source of their defaults.

The cluster spec embeds them (`router.limits`, `router.dispatch`), the `grokserve router` CLI builds its
options from their fields, and the engine and dispatcher read them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EngineLimits(BaseModel):
    """Bounds of one router's engine: queue, batch, step size, KV memory and request size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_queue: int = Field(default=256, ge=1, description="waiting requests before RESOURCE_EXHAUSTED")
    max_running: int = Field(default=64, ge=1, description="sequences in one engine step")
    max_step_tokens: int = Field(default=512, ge=1, description="tokens computed per engine step (decode + prefill)")
    kv_cache_mb: float = Field(default=64, gt=0, description="KV cache memory budget (MiB)")
    block_size: int = Field(default=16, ge=1, le=1024, description="tokens per KV block")
    max_tokens_limit: int = Field(default=4096, ge=1, description="largest max_tokens a request may ask for")
    request_timeout_s: float = Field(default=600.0, gt=0,
                                     description="longest a request may take when its client sets no deadline")
    micro_batch_overlap: bool = Field(default=False,
                                      description="split each step in two halves whose dispatch and attention overlap")
    prefix_cache: bool = Field(default=True, description="reuse the KV blocks of prompt prefixes already computed "
                                                        "(--no-prefix-cache turns it off)")
    stream_yield_s: float = Field(default=0.005, ge=0,
                                  description="after a step, how long the loop may serve stream writes of its outputs "
                                              "before the next step")

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_mb * (1 << 20))


class DispatchSettings(BaseModel):
    """How a router reaches its expert workers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: Literal["auto", "grpc", "shm"] = Field(
        default="auto", description="data plane to expert workers: auto = shared memory for replicas on this host, "
                                    "gRPC otherwise; shm = shared memory, gRPC only where it cannot be set up")
    grpc_call: Literal["stream", "unary"] = Field(default="stream", description="gRPC call style per layer hop")
    shm_slots: int = Field(default=4, ge=1, le=8, description="shared-memory calls in flight per worker replica")
    deadline_s: float = Field(default=10.0, gt=0, description="deadline of one layer's all-to-all")
    down_backoff_s: float = Field(default=1.0, ge=0, description="a failed replica is avoided this long")
