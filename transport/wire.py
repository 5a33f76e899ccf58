"""The one tensor↔bytes codec of the ExpertService, its message limits, and the one place that validates
what arrives.

Routers encode with `encode_request_bytes` / decode with `decode_partial`; workers check every field of a
ForwardRequest against their shard with `decode_request` before any tensor is built. The bytes are
protobuf's (expert.proto), so every transport carries the same message layout.
"""

from __future__ import annotations

import hashlib
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from grokserve.v1 import expert_pb2 as pb

WIRE_DTYPES: dict[int, torch.dtype] = {pb.DTYPE_FLOAT32: torch.float32, pb.DTYPE_BFLOAT16: torch.bfloat16}
DTYPE_TO_WIRE: dict[torch.dtype, int] = {v: k for k, v in WIRE_DTYPES.items()}


class WireError(ValueError):
    """A field of an incoming message is invalid; `field` names it (→ INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    """Row-major little-endian raw bytes (bf16 via a uint8 view; never element by element)."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def bytes_to_tensor(raw: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Zero-copy view of `raw` as a tensor. Received bytes are read-only and callers only read the view, so
    torch's "buffer is not writable" warning is silenced here, for this call only."""
    if not len(raw):
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(raw, dtype=torch.uint8)
    return flat.view(dtype).view(shape)


def max_message_bytes(d_model: int, max_rows: int, experts_per_row: int) -> int:
    """Largest ForwardRequest/Response a shard can need (f32 rows + ids + probabilities), plus framing."""
    return max_rows * (d_model * 4 + experts_per_row * 8) + 4096


# ---- hand-written protobuf encoding of the two hot messages ------------------------------------------
# ForwardRequest / ForwardResponse carry megabytes of tensor bytes; going through protobuf setters and
# SerializeToString copies them several times. These produce the same wire format (checked against the
# protobuf runtime in tests) with a single copy out of tensor memory. Field numbers: expert.proto.


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _uint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


def _bytes_header(number: int, length: int) -> bytes:
    return _varint((number << 3) | 2) + _varint(length)


def _view(t: torch.Tensor) -> memoryview:
    return t.contiguous().view(torch.uint8).numpy().data


@dataclass
class WireMessage:
    """A serialized message as the buffers that make it up, in order: a transport joins them (gRPC) or copies
    them straight into a shared-memory slot, so tensor bytes are copied once."""

    parts: list[bytes | memoryview]

    @property
    def nbytes(self) -> int:
        return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in self.parts)

    def tobytes(self) -> bytes:
        return b"".join(self.parts)


def request_message(call_id: int, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                    expert_probs: torch.Tensor) -> WireMessage:
    """hidden [N, D], expert_ids [N, K] (-1 = not for this worker), expert_probs f32 [N, K] (the router's
    probability of each slot; proto field `gates`) → a ForwardRequest as its buffers."""
    n_rows, d = hidden.shape
    hidden_view = _view(hidden)
    ids_view = _view(expert_ids.to(torch.int32))
    gates_view = _view(expert_probs.to(torch.float32))
    return WireMessage([
        _uint_field(1, call_id) + _uint_field(2, layer) + _uint_field(3, DTYPE_TO_WIRE[hidden.dtype])
        + _uint_field(4, n_rows) + _uint_field(5, d) + _bytes_header(6, hidden_view.nbytes), hidden_view,
        _uint_field(7, expert_ids.shape[1]) + _bytes_header(8, ids_view.nbytes), ids_view,
        _bytes_header(9, gates_view.nbytes), gates_view,
    ])


def encode_request_bytes(call_id: int, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                         expert_probs: torch.Tensor) -> bytes:
    """The same serialized into one bytes object."""
    return request_message(call_id, layer, hidden, expert_ids, expert_probs).tobytes()


def encode_request(call_id: int, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                   expert_probs: torch.Tensor) -> pb.ForwardRequest:
    """The same as a protobuf message object (for tools and tests)."""
    return pb.ForwardRequest.FromString(encode_request_bytes(call_id, layer, hidden, expert_ids, expert_probs))


def response_message(call_id: int, partial: torch.Tensor, compute_seconds: float) -> WireMessage:
    """partial [N, D] (its dtype is the answer's) → a ForwardResponse as its buffers."""
    view = _view(partial)
    return WireMessage([
        _uint_field(1, call_id) + _uint_field(2, DTYPE_TO_WIRE[partial.dtype]) + _uint_field(3, partial.shape[0])
        + _bytes_header(4, view.nbytes), view,
        _varint((5 << 3) | 1) + struct.pack("<d", compute_seconds),
    ])


def encode_response_bytes(call_id: int, wire_dtype: int, partial: torch.Tensor, compute_seconds: float) -> bytes:
    """partial [N, D] → serialized ForwardResponse (`wire_dtype` must be the partial's)."""
    if WIRE_DTYPES.get(wire_dtype) != partial.dtype:
        raise ValueError(f"wire dtype {wire_dtype} does not describe a {partial.dtype} partial")
    return response_message(call_id, partial, compute_seconds).tobytes()


def encode_stream_error_bytes(call_id: int, code: int, message: str) -> bytes:
    """A ForwardResponse with only call_id and `error` set (ForwardStream's in-band refusal)."""
    text = message.encode()
    error = _uint_field(1, code) + _bytes_header(2, len(text)) + text
    return _uint_field(1, call_id) + _bytes_header(6, len(error)) + error


@dataclass
class ResponseView:
    """A parsed ForwardResponse whose `partial` is a zero-copy slice of the received bytes. `release` frees
    the buffer it views (a shared-memory slot) once the caller is done with `partial`."""

    call_id: int = 0
    dtype: int = 0
    num_rows: int = 0
    partial: memoryview = field(default_factory=lambda: memoryview(b""))
    compute_seconds: float = 0.0
    error_code: int = 0
    error_message: str = ""
    release: Callable[[], None] = field(default=lambda: None)

    @property
    def has_error(self) -> bool:
        return bool(self.error_code or self.error_message)


def _read_varint(buf: memoryview, pos: int, what: str = "response") -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise WireError(what, "truncated or oversized varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, what: str = "response") -> Iterator[tuple[int, int, Any]]:
    """Yield (field number, wire type, value) where value is an int or a memoryview; bounds-checked. Errors
    are WireError(`what`, …)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos, what)
        number, wire_type = key >> 3, key & 7
        value: int | memoryview
        if number == 0:
            raise WireError(what, "field number 0")
        if wire_type == 0:
            value, pos = _read_varint(buf, pos, what)
        elif wire_type == 1:
            if pos + 8 > len(buf):
                raise WireError(what, "truncated fixed64")
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos, what)
            if pos + length > len(buf):
                raise WireError(what, f"field {number} claims {length} bytes past the end of the message")
            value, pos = buf[pos:pos + length], pos + length
        elif wire_type == 5:
            if pos + 4 > len(buf):
                raise WireError(what, "truncated fixed32")
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise WireError(what, f"unsupported wire type {wire_type}")
        yield number, wire_type, value


def decode_response_bytes(raw: bytes | memoryview) -> ResponseView:
    """Parse a serialized ForwardResponse without copying `partial`."""
    view = ResponseView()
    for number, wire_type, value in _fields(memoryview(raw)):
        if number == 1 and wire_type == 0:
            view.call_id = value
        elif number == 2 and wire_type == 0:
            view.dtype = value
        elif number == 3 and wire_type == 0:
            view.num_rows = value
        elif number == 4 and wire_type == 2:
            view.partial = value
        elif number == 5 and wire_type == 1:
            view.compute_seconds = struct.unpack("<d", value)[0]
        elif number == 6 and wire_type == 2:
            for sub_number, sub_type, sub_value in _fields(value):
                if sub_number == 1 and sub_type == 0:
                    view.error_code = sub_value
                elif sub_number == 2 and sub_type == 2:
                    view.error_message = bytes(sub_value).decode(errors="replace")
    return view


@dataclass
class ShardLimits:
    """What a worker accepts: its model width, dtype, row cap and the (layer → experts) it holds."""

    hidden_size: int
    n_layers: int
    n_experts: int
    dtype: torch.dtype
    max_rows: int
    held: dict[int, tuple[int, ...]]
    held_mask: dict[int, np.ndarray] = field(init=False)  # layer → bool [E]: a lookup instead of a set difference

    def __post_init__(self) -> None:
        self.held_mask = {}
        for layer, experts in self.held.items():
            mask = np.zeros(self.n_experts, dtype=bool)
            mask[list(experts)] = True
            self.held_mask[layer] = mask


@dataclass
class DecodedRequest:
    layer: int
    hidden: torch.Tensor  # [N, D]
    expert_ids: torch.Tensor  # [N, K] int64
    expert_probs: torch.Tensor  # [N, K] f32
    call_id: int = 0


@dataclass
class RequestView:
    """A parsed ForwardRequest whose byte fields are zero-copy slices of the received buffer (gRPC bytes or a
    shared-memory slot). Field names are expert.proto's."""

    call_id: int = 0
    layer: int = 0
    dtype: int = 0
    num_rows: int = 0
    hidden_size: int = 0
    hidden: memoryview = field(default_factory=lambda: memoryview(b""))
    experts_per_row: int = 0
    expert_ids: memoryview = field(default_factory=lambda: memoryview(b""))
    gates: memoryview = field(default_factory=lambda: memoryview(b""))


_REQUEST_VARINTS = {1: "call_id", 2: "layer", 3: "dtype", 4: "num_rows", 5: "hidden_size", 7: "experts_per_row"}
_REQUEST_BYTES = {6: "hidden", 8: "expert_ids", 9: "gates"}


def parse_request(buf: bytes | memoryview) -> RequestView:
    """Parse a serialized ForwardRequest without copying its tensors; unknown fields are skipped, as protobuf
    does. Raises WireError('request', …) on bytes that are not a ForwardRequest."""
    view = RequestView()
    for number, wire_type, value in _fields(memoryview(buf), "request"):
        if number in _REQUEST_VARINTS:
            if wire_type != 0:
                raise WireError("request", f"field {number} has wire type {wire_type}, expected a varint")
            setattr(view, _REQUEST_VARINTS[number], value)
        elif number in _REQUEST_BYTES:
            if wire_type != 2:
                raise WireError("request", f"field {number} has wire type {wire_type}, expected bytes")
            setattr(view, _REQUEST_BYTES[number], value)
    return view


def decode_request(req: RequestView | pb.ForwardRequest, limits: ShardLimits) -> DecodedRequest:
    """Validate every field against the shard, then build tensors (zero copy of `hidden`). Raises WireError
    naming the field."""
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
    ids = np.frombuffer(req.expert_ids, dtype="<i4").reshape(n_rows, k)  # numpy: µs, not torch's 10 µs/op
    used = ids[ids != -1]
    if used.size == 0:
        raise WireError("expert_ids", "no slot names an expert")
    held = limits.held[req.layer]
    if (used < 0).any() or (used >= limits.n_experts).any() or not limits.held_mask[req.layer][used].all():
        bad = sorted(set(used.tolist()) - set(held))
        raise WireError("expert_ids", f"experts {bad} of layer {req.layer} are not held by this worker "
                                      f"(holds {list(held)})")
    gates_np = np.frombuffer(req.gates, dtype="<f4").reshape(n_rows, k)
    if not np.isfinite(gates_np).all():
        raise WireError("gates", "must all be finite")
    expert_ids = torch.from_numpy(ids.astype(np.int64))
    expert_probs = torch.from_numpy(gates_np.copy())
    hidden = bytes_to_tensor(req.hidden, dtype, (n_rows, limits.hidden_size))
    return DecodedRequest(req.layer, hidden, expert_ids, expert_probs)


def decode_partial(resp: ResponseView, n_rows: int, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """A worker's answer → [N, D] (zero copy), in `dtype` or in float32 (partials of rows split across workers
    come in f32); its size is checked, never trusted."""
    got = WIRE_DTYPES.get(resp.dtype)
    if got not in (dtype, torch.float32):
        raise WireError("partial", f"answer in {got or resp.dtype}, expected {dtype} or float32")
    expected = n_rows * hidden_size * torch.empty((), dtype=got).element_size()
    if resp.num_rows != n_rows or resp.partial.nbytes != expected:
        raise WireError("partial", f"answer of {resp.num_rows} rows / {resp.partial.nbytes} bytes, expected "
                                   f"{n_rows} rows / {expected} bytes of {got}")
    return bytes_to_tensor(resp.partial, got, (n_rows, hidden_size))


def model_id(config) -> str:
    """Model name + a short digest of its architecture, so routers refuse a worker of another model."""
    digest = hashlib.sha256(config.model_dump_json(exclude={"name"}).encode()).hexdigest()[:12]
    return f"{config.name}@{digest}"
