from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamEmbeddingRequest(_message.Message):
    __slots__ = ("last_processed_uuid", "chunk_size", "until_uuid", "only_ids")
    LAST_PROCESSED_UUID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UUID_FIELD_NUMBER: _ClassVar[int]
    ONLY_IDS_FIELD_NUMBER: _ClassVar[int]
    last_processed_uuid: str
    chunk_size: int
    until_uuid: str
    only_ids: bytes
    def __init__(self, last_processed_uuid: _Optional[str] = ..., chunk_size: _Optional[int] = ..., until_uuid: _Optional[str] = ..., only_ids: _Optional[bytes] = ...) -> None: ...

class PartitionPlanRequest(_message.Message):
    __slots__ = ("last_processed_uuid", "rows_per_partition", "max_partitions")
    LAST_PROCESSED_UUID_FIELD_NUMBER: _ClassVar[int]
    ROWS_PER_PARTITION_FIELD_NUMBER: _ClassVar[int]
    MAX_PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    last_processed_uuid: str
    rows_per_partition: int
    max_partitions: int
    def __init__(self, last_processed_uuid: _Optional[str] = ..., rows_per_partition: _Optional[int] = ..., max_partitions: _Optional[int] = ...) -> None: ...

class Partition(_message.Message):
    __slots__ = ("index", "after_uuid", "until_uuid", "rows")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    AFTER_UUID_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UUID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    index: int
    after_uuid: str
    until_uuid: str
    rows: int
    def __init__(self, index: _Optional[int] = ..., after_uuid: _Optional[str] = ..., until_uuid: _Optional[str] = ..., rows: _Optional[int] = ...) -> None: ...

class PartitionPlan(_message.Message):
    __slots__ = ("partitions", "total_rows", "dimension")
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    partitions: _containers.RepeatedCompositeFieldContainer[Partition]
    total_rows: int
    dimension: int
    def __init__(self, partitions: _Optional[_Iterable[_Union[Partition, _Mapping]]] = ..., total_rows: _Optional[int] = ..., dimension: _Optional[int] = ...) -> None: ...

class UploadResult(_message.Message):
    __slots__ = ("success", "total_rows", "message", "rows_rejected", "rejected_by_kind", "deleted", "deletes_blocked")
    class RejectedByKindEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROWS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROWS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_BY_KIND_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    DELETES_BLOCKED_FIELD_NUMBER: _ClassVar[int]
    success: bool
    total_rows: int
    message: str
    rows_rejected: int
    rejected_by_kind: _containers.ScalarMap[str, int]
    deleted: int
    deletes_blocked: int
    def __init__(self, success: _Optional[bool] = ..., total_rows: _Optional[int] = ..., message: _Optional[str] = ..., rows_rejected: _Optional[int] = ..., rejected_by_kind: _Optional[_Mapping[str, int]] = ..., deleted: _Optional[int] = ..., deletes_blocked: _Optional[int] = ...) -> None: ...

class RowChunk(_message.Message):
    __slots__ = ("rows", "sync", "max_delete_fraction", "row_hashes", "hash_version")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    MAX_DELETE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ROW_HASHES_FIELD_NUMBER: _ClassVar[int]
    HASH_VERSION_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[RecruitRow]
    sync: bool
    max_delete_fraction: float
    row_hashes: bytes
    hash_version: str
    def __init__(self, rows: _Optional[_Iterable[_Union[RecruitRow, _Mapping]]] = ..., sync: _Optional[bool] = ..., max_delete_fraction: _Optional[float] = ..., row_hashes: _Optional[bytes] = ..., hash_version: _Optional[str] = ...) -> None: ...

class RecruitRow(_message.Message):
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
    vector: _containers.RepeatedScalarFieldContainer[float]
    defects: _containers.RepeatedCompositeFieldContainer[RowDefect]
    held_vector: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, id: _Optional[str] = ..., company_name: _Optional[str] = ..., exp_years: _Optional[int] = ..., english_level: _Optional[str] = ..., primary_keyword: _Optional[str] = ..., vector: _Optional[_Iterable[float]] = ..., defects: _Optional[_Iterable[_Union[RowDefect, _Mapping]]] = ..., held_vector: _Optional[_Iterable[float]] = ...) -> None: ...

class RowDefect(_message.Message):
    __slots__ = ("column", "error_kind", "message", "value_json")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    column: str
    error_kind: str
    message: str
    value_json: str
    def __init__(self, column: _Optional[str] = ..., error_kind: _Optional[str] = ..., message: _Optional[str] = ..., value_json: _Optional[str] = ...) -> None: ...

class RejectReport(_message.Message):
    __slots__ = ("source", "rows", "rows_received")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    ROWS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    source: str
    rows: _containers.RepeatedCompositeFieldContainer[RejectedRow]
    rows_received: int
    def __init__(self, source: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[RejectedRow, _Mapping]]] = ..., rows_received: _Optional[int] = ...) -> None: ...

class RejectedRow(_message.Message):
    __slots__ = ("id", "error_kind", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    error_kind: str
    message: str
    def __init__(self, id: _Optional[str] = ..., error_kind: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class RejectReportAck(_message.Message):
    __slots__ = ("rows_recorded",)
    ROWS_RECORDED_FIELD_NUMBER: _ClassVar[int]
    rows_recorded: int
    def __init__(self, rows_recorded: _Optional[int] = ...) -> None: ...

class ServerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DefectCount(_message.Message):
    __slots__ = ("column", "error_kind", "rows")
    COLUMN_FIELD_NUMBER: _ClassVar[int]
    ERROR_KIND_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    column: str
    error_kind: str
    rows: int
    def __init__(self, column: _Optional[str] = ..., error_kind: _Optional[str] = ..., rows: _Optional[int] = ...) -> None: ...

class ServerStatus(_message.Message):
    __slots__ = ("rows", "dimension", "ignored_columns", "defects", "rejects", "reports")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    IGNORED_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    DEFECTS_FIELD_NUMBER: _ClassVar[int]
    REJECTS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    rows: int
    dimension: int
    ignored_columns: _containers.RepeatedScalarFieldContainer[str]
    defects: _containers.RepeatedCompositeFieldContainer[DefectCount]
    rejects: _containers.RepeatedCompositeFieldContainer[DefectCount]
    reports: int
    def __init__(self, rows: _Optional[int] = ..., dimension: _Optional[int] = ..., ignored_columns: _Optional[_Iterable[str]] = ..., defects: _Optional[_Iterable[_Union[DefectCount, _Mapping]]] = ..., rejects: _Optional[_Iterable[_Union[DefectCount, _Mapping]]] = ..., reports: _Optional[int] = ...) -> None: ...

class DigestRange(_message.Message):
    __slots__ = ("after_uuid", "until_uuid")
    AFTER_UUID_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UUID_FIELD_NUMBER: _ClassVar[int]
    after_uuid: str
    until_uuid: str
    def __init__(self, after_uuid: _Optional[str] = ..., until_uuid: _Optional[str] = ...) -> None: ...

class RangeDigestRequest(_message.Message):
    __slots__ = ("ranges",)
    RANGES_FIELD_NUMBER: _ClassVar[int]
    ranges: _containers.RepeatedCompositeFieldContainer[DigestRange]
    def __init__(self, ranges: _Optional[_Iterable[_Union[DigestRange, _Mapping]]] = ...) -> None: ...

class RangeDigest(_message.Message):
    __slots__ = ("rows", "digest")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    rows: int
    digest: int
    def __init__(self, rows: _Optional[int] = ..., digest: _Optional[int] = ...) -> None: ...

class RangeDigestReply(_message.Message):
    __slots__ = ("ranges", "hash_version")
    RANGES_FIELD_NUMBER: _ClassVar[int]
    HASH_VERSION_FIELD_NUMBER: _ClassVar[int]
    ranges: _containers.RepeatedCompositeFieldContainer[RangeDigest]
    hash_version: str
    def __init__(self, ranges: _Optional[_Iterable[_Union[RangeDigest, _Mapping]]] = ..., hash_version: _Optional[str] = ...) -> None: ...

class RangeDigestListRequest(_message.Message):
    __slots__ = ("range", "page_rows")
    RANGE_FIELD_NUMBER: _ClassVar[int]
    PAGE_ROWS_FIELD_NUMBER: _ClassVar[int]
    range: DigestRange
    page_rows: int
    def __init__(self, range: _Optional[_Union[DigestRange, _Mapping]] = ..., page_rows: _Optional[int] = ...) -> None: ...

class RangeDigestPage(_message.Message):
    __slots__ = ("ids", "row_hashes")
    IDS_FIELD_NUMBER: _ClassVar[int]
    ROW_HASHES_FIELD_NUMBER: _ClassVar[int]
    ids: bytes
    row_hashes: bytes
    def __init__(self, ids: _Optional[bytes] = ..., row_hashes: _Optional[bytes] = ...) -> None: ...

class CacheInvalidateRequest(_message.Message):
    __slots__ = ("target",)
    TARGET_FIELD_NUMBER: _ClassVar[int]
    target: str
    def __init__(self, target: _Optional[str] = ...) -> None: ...

class CacheInvalidateResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...
