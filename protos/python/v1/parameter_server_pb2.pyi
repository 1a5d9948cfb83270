import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ValueDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VALUE_DTYPE_UNSPECIFIED: _ClassVar[ValueDtype]
    VALUE_DTYPE_FLOAT32: _ClassVar[ValueDtype]
    VALUE_DTYPE_FLOAT16: _ClassVar[ValueDtype]
    VALUE_DTYPE_BFLOAT16: _ClassVar[ValueDtype]

class Compressor(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSOR_UNSPECIFIED: _ClassVar[Compressor]
    COMPRESSOR_TOPK: _ClassVar[Compressor]
    COMPRESSOR_RANDK: _ClassVar[Compressor]
    COMPRESSOR_IDENTITY: _ClassVar[Compressor]
    COMPRESSOR_QSGD: _ClassVar[Compressor]
    COMPRESSOR_NATURAL: _ClassVar[Compressor]
    COMPRESSOR_SIGN: _ClassVar[Compressor]
    COMPRESSOR_PERMK: _ClassVar[Compressor]
    COMPRESSOR_NATURAL_DITHERING: _ClassVar[Compressor]

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACK_STATUS_UNSPECIFIED: _ClassVar[AckStatus]
    ACK_STATUS_ACCEPTED: _ClassVar[AckStatus]
    ACK_STATUS_DUPLICATE: _ClassVar[AckStatus]
    ACK_STATUS_REJECTED: _ClassVar[AckStatus]
VALUE_DTYPE_UNSPECIFIED: ValueDtype
VALUE_DTYPE_FLOAT32: ValueDtype
VALUE_DTYPE_FLOAT16: ValueDtype
VALUE_DTYPE_BFLOAT16: ValueDtype
COMPRESSOR_UNSPECIFIED: Compressor
COMPRESSOR_TOPK: Compressor
COMPRESSOR_RANDK: Compressor
COMPRESSOR_IDENTITY: Compressor
COMPRESSOR_QSGD: Compressor
COMPRESSOR_NATURAL: Compressor
COMPRESSOR_SIGN: Compressor
COMPRESSOR_PERMK: Compressor
COMPRESSOR_NATURAL_DITHERING: Compressor
ACK_STATUS_UNSPECIFIED: AckStatus
ACK_STATUS_ACCEPTED: AckStatus
ACK_STATUS_DUPLICATE: AckStatus
ACK_STATUS_REJECTED: AckStatus

class SparseUpdate(_message.Message):
    __slots__ = ("dim", "nnz", "indices", "values", "dtype", "compressor", "seed", "packed", "scale", "levels")
    DIM_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    dim: int
    nnz: int
    indices: bytes
    values: bytes
    dtype: ValueDtype
    compressor: Compressor
    seed: int
    packed: bytes
    scale: float
    levels: int
    def __init__(self, dim: _Optional[int] = ..., nnz: _Optional[int] = ..., indices: _Optional[bytes] = ..., values: _Optional[bytes] = ..., dtype: _Optional[_Union[ValueDtype, str]] = ..., compressor: _Optional[_Union[Compressor, str]] = ..., seed: _Optional[int] = ..., packed: _Optional[bytes] = ..., scale: _Optional[float] = ..., levels: _Optional[int] = ...) -> None: ...

class SparseModelDelta(_message.Message):
    __slots__ = ("round", "delta", "lr")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    round: int
    delta: SparseUpdate
    lr: float
    def __init__(self, round: _Optional[int] = ..., delta: _Optional[_Union[SparseUpdate, _Mapping]] = ..., lr: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "token", "config_digest")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    token: bytes
    config_digest: str
    def __init__(self, worker_id: _Optional[str] = ..., token: _Optional[bytes] = ..., config_digest: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "offset", "numel")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUMEL_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    numel: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., numel: _Optional[int] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("dim", "dtype", "tensors")
    DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    dim: int
    dtype: ValueDtype
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    def __init__(self, dim: _Optional[int] = ..., dtype: _Optional[_Union[ValueDtype, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("rank", "count", "offset", "total_dim")
    RANK_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DIM_FIELD_NUMBER: _ClassVar[int]
    rank: int
    count: int
    offset: int
    total_dim: int
    def __init__(self, rank: _Optional[int] = ..., count: _Optional[int] = ..., offset: _Optional[int] = ..., total_dim: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("model", "config_json", "config_digest", "compressor", "k_max", "accepted_dtypes", "max_update_bytes", "round", "last_seq", "shard")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    K_MAX_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DTYPES_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    config_json: str
    config_digest: str
    compressor: Compressor
    k_max: int
    accepted_dtypes: _containers.RepeatedScalarFieldContainer[ValueDtype]
    max_update_bytes: int
    round: int
    last_seq: int
    shard: ShardInfo
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., config_json: _Optional[str] = ..., config_digest: _Optional[str] = ..., compressor: _Optional[_Union[Compressor, str]] = ..., k_max: _Optional[int] = ..., accepted_dtypes: _Optional[_Iterable[_Union[ValueDtype, str]]] = ..., max_update_bytes: _Optional[int] = ..., round: _Optional[int] = ..., last_seq: _Optional[int] = ..., shard: _Optional[_Union[ShardInfo, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("worker_id", "round", "known_round", "wait", "has_aggregate")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KNOWN_ROUND_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    HAS_AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    known_round: int
    wait: bool
    has_aggregate: bool
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., known_round: _Optional[int] = ..., wait: _Optional[bool] = ..., has_aggregate: _Optional[bool] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("round", "offset", "total_dim", "data")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DIM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    round: int
    offset: int
    total_dim: int
    data: bytes
    def __init__(self, round: _Optional[int] = ..., offset: _Optional[int] = ..., total_dim: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelUpdate(_message.Message):
    __slots__ = ("model", "aggregate", "delta")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    model: ModelChunk
    aggregate: ModelChunk
    delta: SparseModelDelta
    def __init__(self, model: _Optional[_Union[ModelChunk, _Mapping]] = ..., aggregate: _Optional[_Union[ModelChunk, _Mapping]] = ..., delta: _Optional[_Union[SparseModelDelta, _Mapping]] = ...) -> None: ...

class PushUpdateRequest(_message.Message):
    __slots__ = ("worker_id", "round", "seq", "update")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    seq: int
    update: SparseUpdate
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., seq: _Optional[int] = ..., update: _Optional[_Union[SparseUpdate, _Mapping]] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("status", "reason", "code", "round", "last_seq")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    status: AckStatus
    reason: str
    code: int
    round: int
    last_seq: int
    def __init__(self, status: _Optional[_Union[AckStatus, str]] = ..., reason: _Optional[str] = ..., code: _Optional[int] = ..., round: _Optional[int] = ..., last_seq: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker_id", "last_seen", "last_seq", "last_round")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    last_seen: _timestamp_pb2.Timestamp
    last_seq: int
    last_round: int
    def __init__(self, worker_id: _Optional[str] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seq: _Optional[int] = ..., last_round: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("round", "workers", "bytes_in", "bytes_out", "rounds", "finished", "phase", "num_workers", "registered", "suspicion")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_FIELD_NUMBER: _ClassVar[int]
    BYTES_OUT_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    SUSPICION_FIELD_NUMBER: _ClassVar[int]
    round: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    bytes_in: int
    bytes_out: int
    rounds: int
    finished: bool
    phase: str
    num_workers: int
    registered: int
    suspicion: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, round: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., bytes_in: _Optional[int] = ..., bytes_out: _Optional[int] = ..., rounds: _Optional[int] = ..., finished: _Optional[bool] = ..., phase: _Optional[str] = ..., num_workers: _Optional[int] = ..., registered: _Optional[int] = ..., suspicion: _Optional[_Iterable[float]] = ...) -> None: ...
