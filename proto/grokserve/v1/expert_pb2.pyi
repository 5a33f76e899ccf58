from collections.abc import Iterable as _Iterable
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType

class ForwardRequest(_message.Message):
    __slots__ = ("call_id", "dtype", "expert_ids", "experts_per_row", "gates", "hidden", "hidden_size", "layer", "num_rows")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_ROW_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    GATES_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    layer: int
    dtype: DType
    num_rows: int
    hidden_size: int
    hidden: bytes
    experts_per_row: int
    expert_ids: bytes
    gates: bytes
    def __init__(self, call_id: int | None = ..., layer: int | None = ..., dtype: DType | str | None = ..., num_rows: int | None = ..., hidden_size: int | None = ..., hidden: bytes | None = ..., experts_per_row: int | None = ..., expert_ids: bytes | None = ..., gates: bytes | None = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("call_id", "compute_seconds", "dtype", "error", "num_rows", "partial")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_ROWS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: int
    dtype: DType
    num_rows: int
    partial: bytes
    compute_seconds: float
    error: StreamError
    def __init__(self, call_id: int | None = ..., dtype: DType | str | None = ..., num_rows: int | None = ..., partial: bytes | None = ..., compute_seconds: float | None = ..., error: StreamError | _Mapping | None = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: int | None = ..., message: str | None = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("expert_ids", "layer")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: int | None = ..., expert_ids: _Iterable[int] | None = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("device", "dtype", "hidden_size", "max_rows", "model_id", "num_experts", "num_layers", "resident_bytes", "shard")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    num_layers: int
    num_experts: int
    hidden_size: int
    dtype: DType
    device: str
    max_rows: int
    shard: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    resident_bytes: int
    def __init__(self, model_id: str | None = ..., num_layers: int | None = ..., num_experts: int | None = ..., hidden_size: int | None = ..., dtype: DType | str | None = ..., device: str | None = ..., max_rows: int | None = ..., shard: _Iterable[LayerExperts | _Mapping] | None = ..., resident_bytes: int | None = ...) -> None: ...
