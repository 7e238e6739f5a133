from airflow_embedding_provider.wire import embedding_pb2 as _embedding_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RowChunkBytes(_message.Message):
    __slots__ = ("rows", "sync", "max_delete_fraction", "row_hashes", "hash_version")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    MAX_DELETE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ROW_HASHES_FIELD_NUMBER: _ClassVar[int]
    HASH_VERSION_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[RecruitRowBytes]
    sync: bool
    max_delete_fraction: float
    row_hashes: bytes
    hash_version: str
    def __init__(self, rows: _Optional[_Iterable[_Union[RecruitRowBytes, _Mapping]]] = ..., sync: _Optional[bool] = ..., max_delete_fraction: _Optional[float] = ..., row_hashes: _Optional[bytes] = ..., hash_version: _Optional[str] = ...) -> None: ...

class RecruitRowBytes(_message.Message):
    __slots__ = ("id", "company_name", "exp_years", "english_level", "primary_keyword", "vector", "defects", "held_vector")
    ID_FIELD_NUMBER: _ClassVar[int]
    COMPANY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXP_YEARS_FIELD_NUMBER: _ClassVar[int]
    ENGLISH_LEVEL_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_KEYWORD_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DEFECTS_FIELD_NUMBER: _ClassVar[int]
    HELD_VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: str
    company_name: str
    exp_years: int
    english_level: str
    primary_keyword: str
    vector: bytes
    defects: _containers.RepeatedCompositeFieldContainer[_embedding_pb2.RowDefect]
    held_vector: bytes
    def __init__(self, id: _Optional[str] = ..., company_name: _Optional[str] = ..., exp_years: _Optional[int] = ..., english_level: _Optional[str] = ..., primary_keyword: _Optional[str] = ..., vector: _Optional[bytes] = ..., defects: _Optional[_Iterable[_Union[_embedding_pb2.RowDefect, _Mapping]]] = ..., held_vector: _Optional[bytes] = ...) -> None: ...

class RowChunkRaw(_message.Message):
    __slots__ = ("rows", "sync", "max_delete_fraction")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    MAX_DELETE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[RecruitRowRaw]
    sync: bool
    max_delete_fraction: float
    def __init__(self, rows: _Optional[_Iterable[_Union[RecruitRowRaw, _Mapping]]] = ..., sync: _Optional[bool] = ..., max_delete_fraction: _Optional[float] = ...) -> None: ...

class RecruitRowRaw(_message.Message):
    __slots__ = ("id", "company_name", "exp_years", "english_level", "primary_keyword", "vector", "defects", "held_vector")
    ID_FIELD_NUMBER: _ClassVar[int]
    COMPANY_NAME_FIELD_NUMBER: _ClassVar[int]
    EXP_YEARS_FIELD_NUMBER: _ClassVar[int]
    ENGLISH_LEVEL_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_KEYWORD_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DEFECTS_FIELD_NUMBER: _ClassVar[int]
    HELD_VECTOR_FIELD_NUMBER: _ClassVar[int]
    id: bytes
    company_name: bytes
    exp_years: int
    english_level: bytes
    primary_keyword: bytes
    vector: bytes
    defects: _containers.RepeatedCompositeFieldContainer[RawDefect]
    held_vector: bytes
    def __init__(self, id: _Optional[bytes] = ..., company_name: _Optional[bytes] = ..., exp_years: _Optional[int] = ..., english_level: _Optional[bytes] = ..., primary_keyword: _Optional[bytes] = ..., vector: _Optional[bytes] = ..., defects: _Optional[_Iterable[_Union[RawDefect, _Mapping]]] = ..., held_vector: _Optional[bytes] = ...) -> None: ...

class RawDefect(_message.Message):
    __slots__ = ("column", "error_kind", "message", "value_json")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    column: bytes
    error_kind: bytes
    message: bytes
    value_json: bytes
    def __init__(self, column: _Optional[bytes] = ..., error_kind: _Optional[bytes] = ..., message: _Optional[bytes] = ..., value_json: _Optional[bytes] = ...) -> None: ...
