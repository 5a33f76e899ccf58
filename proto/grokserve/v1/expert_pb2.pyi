from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

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
    __slots__ = ("call_id", "layer", "dtype", "num_rows", "hidden_size", "hidden", "experts_per_row", "expert_ids", "gates")
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
    def __init__(self, call_id: _Optional[int] = ..., layer: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., num_rows: _Optional[int] = ..., hidden_size: _Optional[int] = ..., hidden: _Optional[bytes] = ..., experts_per_row: _Optional[int] = ..., expert_ids: _Optional[bytes] = ..., gates: _Optional[bytes] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("call_id", "dtype", "num_rows", "partial", "compute_seconds", "error")
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
    def __init__(self, call_id: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., num_rows: _Optional[int] = ..., partial: _Optional[bytes] = ..., compute_seconds: _Optional[float] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerExperts(_message.Message):
    __slots__ = ("layer", "expert_ids")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model_id", "num_layers", "num_experts", "hidden_size", "dtype", "device", "max_rows", "shard", "resident_bytes", "host_id", "shared_memory", "weights")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    num_layers: int
    num_experts: int
    hidden_size: int
    dtype: DType
    device: str
    max_rows: int
    shard: _containers.RepeatedCompositeFieldContainer[LayerExperts]
    resident_bytes: int
    host_id: str
    shared_memory: bool
    weights: str
    def __init__(self, model_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., hidden_size: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., device: _Optional[str] = ..., max_rows: _Optional[int] = ..., shard: _Optional[_Iterable[_Union[LayerExperts, _Mapping]]] = ..., resident_bytes: _Optional[int] = ..., host_id: _Optional[str] = ..., shared_memory: _Optional[bool] = ..., weights: _Optional[str] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("host_id", "slots")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    slots: int
    def __init__(self, host_id: _Optional[str] = ..., slots: _Optional[int] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("socket", "token", "slots", "request_bytes", "response_bytes")
    SOCKET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    socket: str
    token: bytes
    slots: int
    request_bytes: int
    response_bytes: int
    def __init__(self, socket: _Optional[str] = ..., token: _Optional[bytes] = ..., slots: _Optional[int] = ..., request_bytes: _Optional[int] = ..., response_bytes: _Optional[int] = ...) -> None: ...
