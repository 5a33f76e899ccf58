"""The one tensor↔bytes codec of the ExpertService and the one place that validates what arrives.

Routers encode with `encode_request` / decode with `decode_partial`; workers check every field of a
ForwardRequest against their shard with `decode_request` before any tensor is built.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import torch

from grokserve.v1 import expert_pb2 as pb

# Received protobuf bytes are read-only; tensors viewing them are only ever read (zero copy by design).
warnings.filterwarnings("ignore", message="The given buffer is not writable")

WIRE_DTYPES = {pb.DTYPE_FLOAT32: torch.float32, pb.DTYPE_BFLOAT16: torch.bfloat16}
DTYPE_TO_WIRE = {v: k for k, v in WIRE_DTYPES.items()}


class WireError(ValueError):
    """A field of an incoming message is invalid; `field` names it (→ INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Row-major little-endian raw bytes (bf16 via a uint8 view; never element by element)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def bytes_to_tensor(raw: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-copy view of `raw` (read-only bytes) as a tensor; callers only read it."""
    if not raw:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)


def encode_request(call_id: int, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                   gates: torch.Tensor) -> pb.ForwardRequest:
    """hidden [N, D], expert_ids [N, K] (-1 = not for this worker), gates f32 [N, K] → ForwardRequest."""
    n_rows, d = hidden.shape
    return pb.ForwardRequest(
        call_id=call_id, layer=layer, dtype=DTYPE_TO_WIRE[hidden.dtype], num_rows=n_rows, hidden_size=d,
        hidden=tensor_to_bytes(hidden), experts_per_row=expert_ids.shape[1],
        expert_ids=tensor_to_bytes(expert_ids.to(torch.int32)), gates=tensor_to_bytes(gates.to(torch.float32)),
    )


@dataclass
class ShardLimits:
    """What a worker accepts: its model width, dtype, row cap and the (layer → experts) it holds."""

    hidden_size: int
    n_layers: int
    n_experts: int
    dtype: torch.dtype
    max_rows: int
    held: dict[int, tuple[int, ...]]


@dataclass
class DecodedRequest:
    layer: int
    hidden: torch.Tensor  # [N, D]
    expert_ids: torch.Tensor  # [N, K] int64
    gates: torch.Tensor  # [N, K] f32


def decode_request(req: pb.ForwardRequest, limits: ShardLimits) -> DecodedRequest:
    """Validate every field against the shard, then build tensors. Raises WireError naming the field."""
    if req.dtype not in WIRE_DTYPES:
        raise WireError("dtype", f"unknown dtype enum {req.dtype}")
    dtype = WIRE_DTYPES[req.dtype]
    if dtype != limits.dtype:
        raise WireError("dtype", f"{dtype} sent, this worker computes in {limits.dtype}")
    if req.hidden_size != limits.hidden_size:
        raise WireError("hidden_size", f"{req.hidden_size} does not match the model width {limits.hidden_size}")
    n_rows = req.num_rows
    if n_rows == 0:
        raise WireError("num_rows", "must be ≥ 1 (empty message)")
    if n_rows > limits.max_rows:
        raise WireError("num_rows", f"{n_rows} exceeds this worker's max_rows {limits.max_rows}")
    if req.layer >= limits.n_layers:
        raise WireError("layer", f"{req.layer} is out of range [0, {limits.n_layers})")
    if req.layer not in limits.held:
        raise WireError("layer", f"layer {req.layer} is not held by this worker")
    k = req.experts_per_row
    if not 1 <= k <= limits.n_experts:
        raise WireError("experts_per_row", f"{k} is not in [1, {limits.n_experts}]")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = n_rows * limits.hidden_size * itemsize
    if len(req.hidden) != expected:
        raise WireError("hidden", f"{len(req.hidden)} bytes, but num_rows·hidden_size·{itemsize} = {expected}")
    if len(req.expert_ids) != n_rows * k * 4:
        raise WireError("expert_ids", f"{len(req.expert_ids)} bytes, expected num_rows·experts_per_row·4 = "
                                      f"{n_rows * k * 4}")
    if len(req.gates) != n_rows * k * 4:
        raise WireError("gates", f"{len(req.gates)} bytes, expected num_rows·experts_per_row·4 = {n_rows * k * 4}")
    expert_ids = bytes_to_tensor(req.expert_ids, torch.int32, (n_rows, k)).to(torch.int64)
    held = limits.held[req.layer]
    used = expert_ids[expert_ids != -1]
    if used.numel() == 0:
        raise WireError("expert_ids", "no slot names an expert")
    bad = sorted(set(used.tolist()) - set(held))
    if bad:
        raise WireError("expert_ids", f"experts {bad} of layer {req.layer} are not held by this worker "
                                      f"(holds {list(held)})")
    gates = bytes_to_tensor(req.gates, torch.float32, (n_rows, k))
    if not bool(torch.isfinite(gates).all()):
        raise WireError("gates", "must all be finite")
    hidden = bytes_to_tensor(req.hidden, dtype, (n_rows, limits.hidden_size))
    return DecodedRequest(req.layer, hidden, expert_ids, gates)


def decode_partial(resp: pb.ForwardResponse, n_rows: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A worker's answer → [N, D]; its size is checked, never trusted."""
    expected = n_rows * hidden_size * torch.empty((), dtype=dtype).element_size()
    if resp.num_rows != n_rows or len(resp.partial) != expected or WIRE_DTYPES.get(resp.dtype) != dtype:
        raise WireError("partial", f"answer of {resp.num_rows} rows / {len(resp.partial)} bytes, expected "
                                   f"{n_rows} rows / {expected} bytes of {dtype}")
    return bytes_to_tensor(resp.partial, dtype, (n_rows, hidden_size))


def model_id(config) -> str:
    """Model name + a short digest of its architecture, so routers refuse a worker of another model."""
    digest = hashlib.sha256(config.model_dump_json(exclude={"name"}).encode()).hexdigest()[:12]
    return f"{config.name}@{digest}"
