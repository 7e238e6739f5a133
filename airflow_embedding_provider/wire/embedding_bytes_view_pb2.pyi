from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RowChunkBytes(_message.Message):
    __slots__ = ("rows", "sync", "max_delete_fraction")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    MAX_DELETE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[RecruitRowBytes]
    sync: bool
    max_delete_fraction: float
    def __init__(self, rows: _Optional[_Iterable[_Union[RecruitRowBytes, _Mapping]]] = ..., sync: _Optional[bool] = ..., max_delete_fraction: _Optional[float] = ...) -> None: ...

class RecruitRowBytes(_message.Message):
    __slots__ = ("id", "company_name", "exp_years", "english_level", "primary_keyword", "vector")
    ID_FIELD_NUMBER: _ClassVar[int]
    COMPANY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXP_YEARS_FIELD_NUMBER: _ClassVar[int]
    ENGLISH_LEVEL_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_KEYWORD_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    company_name: str
    exp_years: int
    english_level: str
    primary_keyword: str
    vector: bytes
    def __init__(self, id: _Optional[str] = ..., company_name: _Optional[str] = ..., exp_years: _Optional[int] = ..., english_level: _Optional[str] = ..., primary_keyword: _Optional[str] = ..., vector: _Optional[bytes] = ...) -> None: ...
