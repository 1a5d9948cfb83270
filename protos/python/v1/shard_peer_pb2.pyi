from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PartKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PART_KIND_UNSPECIFIED: _ClassVar[PartKind]
    PART_KIND_COLLECTIVE: _ClassVar[PartKind]
    PART_KIND_MODEL: _ClassVar[PartKind]
PART_KIND_UNSPECIFIED: PartKind
PART_KIND_COLLECTIVE: PartKind
PART_KIND_MODEL: PartKind

class FetchPartRequest(_message.Message):
    __slots__ = ("kind", "round", "step", "rank", "wait_ms")
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    kind: PartKind
    round: int
    step: int
    rank: int
    wait_ms: int
    def __init__(self, kind: _Optional[_Union[PartKind, str]] = ..., round: _Optional[int] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., wait_ms: _Optional[int] = ...) -> None: ...

class PartReply(_message.Message):
    __slots__ = ("ready", "shape", "dtype", "data", "round")
    READY_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    round: int
    def __init__(self, ready: _Optional[bool] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ..., round: _Optional[int] = ...) -> None: ...
