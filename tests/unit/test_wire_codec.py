"""The hand-written ExpertService codec produces and parses exactly protobuf's wire format."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grokserve.transport import wire
from grokserve.v1 import expert_pb2 as pb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_request_bytes_equal_protobuf_serialization(dtype):
    hidden = torch.randn(5, 16).to(dtype)
    ids = torch.tensor([[0, 3], [1, -1], [2, 7], [-1, 4], [5, 6]])
    gates = torch.rand(5, 2)
    raw = wire.encode_request_bytes(300, 7, hidden, ids, gates)
    reference = pb.ForwardRequest(
        call_id=300, layer=7, dtype=wire.DTYPE_TO_WIRE[dtype], num_rows=5, hidden_size=16,
        hidden=wire.tensor_to_bytes(hidden), experts_per_row=2,
        expert_ids=wire.tensor_to_bytes(ids.to(torch.int32)), gates=wire.tensor_to_bytes(gates))
    assert raw == reference.SerializeToString()


def test_response_bytes_round_trip_through_protobuf():
    partial = torch.randn(3, 8).to(torch.bfloat16)
    raw = wire.encode_response_bytes(2**40, pb.DTYPE_BFLOAT16, partial, 0.25)
    parsed = pb.ForwardResponse.FromString(raw)
    fields = (parsed.call_id, parsed.dtype, parsed.num_rows, parsed.compute_seconds)
    assert fields == (2**40, pb.DTYPE_BFLOAT16, 3, 0.25)
    view = wire.decode_response_bytes(raw)
    assert torch.equal(wire.decode_partial(view, 3, 8, torch.bfloat16), partial)
    assert view.compute_seconds == 0.25 and not view.has_error


def test_stream_error_is_parsed_from_protobuf_bytes():
    raw = pb.ForwardResponse(call_id=9, error=pb.StreamError(code=3, message="layer: bad")).SerializeToString()
    assert raw == wire.encode_stream_error_bytes(9, 3, "layer: bad")
    view = wire.decode_response_bytes(raw)
    assert (view.call_id, view.error_code, view.error_message, view.has_error) == (9, 3, "layer: bad", True)


def test_answer_of_the_wrong_size_is_refused():
    raw = wire.encode_response_bytes(1, pb.DTYPE_FLOAT32, torch.zeros(2, 8), 0.0)
    with pytest.raises(wire.WireError, match="partial"):
        wire.decode_partial(wire.decode_response_bytes(raw), 3, 8, torch.float32)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_hostile_answer_bytes_raise_wire_error_or_parse(data):
    with contextlib.suppress(wire.WireError):  # any other exception type fails the test
        wire.decode_response_bytes(data)
