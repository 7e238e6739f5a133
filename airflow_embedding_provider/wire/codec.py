"""Encode and decode ``RowChunk`` messages with vectors as raw float32 bytes.

The public contract declares ``repeated float vector = 6`` (packed). We parse and build messages
through ``RowChunkBytes``, a view with ``bytes vector = 6`` that is identical on the wire, so a
vector crosses the Python boundary as one bytes object and never float by float.
"""

from __future__ import annotations

import base64
import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from airflow_embedding_provider.digest import HASH_BYTES, HASH_VERSION, Hashes, unpack_hashes
from airflow_embedding_provider.rows import CellDefect, FloatMatrix, RowBatch
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.contract import MAX_CHUNK_BYTES as MAX_CHUNK_BYTES
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import (
    RecruitRowBytes,
    RowChunkBytes,
    RowChunkRaw,
)

FLOAT32_LE = np.dtype("<f4")


@dataclass(frozen=True)
class WireChunk:
    """A received chunk, still unvalidated: values as the peer sent them.

    ``vectors`` holds each row's raw little-endian float32 bytes; it is up to validation to
    check their length against the configured dimension. ``defects`` holds, by position, the
    cells a row's sender marked as not servable (``RowDefect``): such a row goes to the DLQ.
    ``row_hashes`` are the sender's hashes of the rows (``RowChunk.row_hashes``) when it sent one
    for every row under this package's :data:`~airflow_embedding_provider.digest.HASH_VERSION`,
    else ``None``: unchecked claims, which validation checks before a batch carries them.
    """

    ids: list[str]
    company_name: list[str | None]
    exp_years: list[int | None]
    english_level: list[str | None]
    primary_keyword: list[str | None]
    vectors: list[bytes]
    defects: dict[int, tuple[CellDefect, ...]] = field(default_factory=dict)
    #: Upload options (``RowChunk.sync``, ``max_delete_fraction``), read from an upload's first message.
    sync: bool = False
    max_delete_fraction: float | None = None
    row_hashes: Hashes | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def slice(self, start: int, stop: int) -> WireChunk:
        return WireChunk(
            ids=self.ids[start:stop],
            company_name=self.company_name[start:stop],
            exp_years=self.exp_years[start:stop],
            english_level=self.english_level[start:stop],
            primary_keyword=self.primary_keyword[start:stop],
            vectors=self.vectors[start:stop],
            defects={i - start: d for i, d in self.defects.items() if start <= i < stop},
            row_hashes=None if self.row_hashes is None else self.row_hashes[start:stop],
        )


def _vector_bytes(row: RecruitRowBytes) -> bytes:
    if row.held_vector:  # a defective row's vector (embedding.proto, RecruitRow.held_vector)
        return row.held_vector
    if row.vector or not row.ListFields():
        return row.vector
    # An encoder may legally send a repeated float unpacked (one fixed32 record a float). The
    # bytes view then keeps those records as unknown fields and sees no vector; parse that rare
    # row through the public message instead of losing its vector.
    public = embedding_pb2.RecruitRow.FromString(row.SerializeToString())
    return np.asarray(public.vector or public.held_vector, dtype=FLOAT32_LE).tobytes()


def _json_value(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return {"type": "str", "repr": text[:2000]}  # a peer's malformed JSON: kept as its text


def _defects(rows: Sequence[RecruitRowBytes], candidates: Sequence[int]) -> dict[int, tuple[CellDefect, ...]]:
    return {
        i: tuple(CellDefect(d.column, d.error_kind, d.message, _json_value(d.value_json)) for d in rows[i].defects)
        for i in candidates
        if rows[i].defects
    }


#: The fields of a row as :func:`decode_chunk` reads them, in one C-level call a row.
_ROW_FIELDS = operator.attrgetter("id", "company_name", "exp_years", "english_level", "primary_keyword", "vector")


def decode_chunk(message: RowChunkBytes) -> WireChunk:
    rows = message.rows
    if not rows:
        return WireChunk([], [], [], [], [], [], **_upload_options(message))
    # Every field of every row in one pass (an unset optional reads as the empty value), then the
    # rare empty values checked with ``HasField``: about a quarter cheaper than a pass a column.
    ids, company, years, english, keyword, raw = (list(c) for c in zip(*map(_ROW_FIELDS, rows), strict=True))
    for column, name in ((company, "company_name"), (english, "english_level"), (keyword, "primary_keyword")):
        if "" in column:
            _unset_to_none(rows, column, name, "")
    if 0 in years:
        _unset_to_none(rows, years, "exp_years", 0)
    # A marked row carries no ``vector`` (embedding.proto: it moves to ``held_vector``), so only rows
    # without one are looked at for defects: a clean chunk pays one C-level ``all`` for it.
    if all(raw):
        vectors, defects = raw, {}
    else:
        vectors = [b or _vector_bytes(rows[i]) for i, b in enumerate(raw)]
        defects = _defects(rows, [i for i, b in enumerate(raw) if not b])
    return WireChunk(
        ids=ids,
        company_name=company,
        exp_years=years,
        english_level=english,
        primary_keyword=keyword,
        vectors=vectors,
        defects=defects,
        row_hashes=_row_hashes(message, len(ids)),
        **_upload_options(message),
    )


def _row_hashes(message: RowChunkBytes, rows: int) -> Hashes | None:
    """The sender's row hashes, when it sent one a row under this package's definition."""
    raw = message.row_hashes
    if len(raw) != HASH_BYTES * rows or message.hash_version != HASH_VERSION:
        return None
    return unpack_hashes(raw)


def _unset_to_none(rows: Sequence[RecruitRowBytes], column: list[Any], name: str, empty: object) -> None:
    """``None`` in ``column`` where the row does not set the optional field ``name`` (it read as ``empty``)."""
    for i, value in enumerate(column):
        if value == empty and not rows[i].HasField(name):
            column[i] = None


def _upload_options(message: Any) -> dict[str, Any]:
    """A chunk's upload options (range sync); only an upload's first chunk sets them."""
    if not message.sync and not message.HasField("max_delete_fraction"):
        return {}
    fraction = message.max_delete_fraction if message.HasField("max_delete_fraction") else None
    return {"sync": message.sync, "max_delete_fraction": fraction}


def parse_chunk(data: bytes) -> WireChunk:
    """Deserialize one serialized ``RowChunk``."""
    return decode_chunk(RowChunkBytes.FromString(data))


def parse_chunk_lenient(data: bytes) -> WireChunk:
    """:func:`parse_chunk`, except that text which is not valid UTF-8 costs only its row: such a
    cell is left unset and the row marked ``invalid_utf8`` with the bytes as they arrived (protobuf
    refuses the whole message otherwise). Any other malformation still raises ``DecodeError``."""
    try:
        return parse_chunk(data)
    except DecodeError:
        raw = RowChunkRaw.FromString(data)  # the same fields with text as bytes
    return _decode_raw(raw)


_RAW_TEXT = ("id", "company_name", "english_level", "primary_keyword")


def _decode_raw(message: RowChunkRaw) -> WireChunk:
    columns: dict[str, list[Any]] = {name: [] for name in _RAW_TEXT}
    years: list[int | None] = []
    vectors: list[bytes] = []
    defects: dict[int, tuple[CellDefect, ...]] = {}
    for i, row in enumerate(message.rows):
        marked = [_raw_defect(d) for d in row.defects]
        for name in _RAW_TEXT:
            value: bytes | None = getattr(row, name) if name == "id" or row.HasField(name) else None
            text: str | None = None
            if value is not None:
                try:
                    text = value.decode("utf-8")
                except UnicodeDecodeError as exc:
                    marked.append(_utf8_defect(name, value, exc))
            columns[name].append("" if name == "id" and text is None else text)
        years.append(row.exp_years if row.HasField("exp_years") else None)
        vectors.append(row.held_vector or row.vector)
        if marked:
            defects[i] = tuple(marked)
    return WireChunk(
        ids=columns["id"],
        company_name=columns["company_name"],
        exp_years=years,
        english_level=columns["english_level"],
        primary_keyword=columns["primary_keyword"],
        vectors=vectors,
        defects=defects,
        **_upload_options(message),
    )


def _raw_defect(d: Any) -> CellDefect:
    def text(b: bytes) -> str:
        return b.decode("utf-8", "replace")

    return CellDefect(text(d.column), text(d.error_kind), text(d.message), _json_value(text(d.value_json)))


def _utf8_defect(name: str, value: bytes, exc: UnicodeDecodeError) -> CellDefect:
    shown = value[max(0, exc.start - 8) : exc.end + 8]
    return CellDefect(
        name,
        "invalid_utf8",
        f"{name} is not valid UTF-8 (byte {exc.start}: {shown!r})",
        {"type": "bytes", "base64": base64.b64encode(value[:65536]).decode(), "length": len(value)},
    )


def encode_rows(
    ids: Sequence[str],
    company_name: Sequence[str | None],
    exp_years: Sequence[int | None],
    english_level: Sequence[str | None],
    primary_keyword: Sequence[str | None],
    vectors: FloatMatrix,
) -> RowChunkBytes:
    """Build one ``RowChunk`` (as its bytes view) from columns; ``None`` leaves a field unset."""
    matrix = np.ascontiguousarray(vectors, dtype=FLOAT32_LE)
    # One bytes object for the whole matrix, sliced a row at a time, and ``rows.add`` with keywords:
    # about half the cost of building each row as its own message and handing over the list.
    raw = matrix.tobytes()
    width = 4 * matrix.shape[1] if matrix.ndim == 2 else 0
    message = RowChunkBytes()
    add = message.rows.add
    starts = range(0, len(ids) * width, width) if width else [0] * len(ids)
    for row_id, company, years, english, keyword, at in zip(
        ids, company_name, exp_years, english_level, primary_keyword, starts, strict=True
    ):
        add(
            id=row_id,
            company_name=company,
            exp_years=years,
            english_level=english,
            primary_keyword=keyword,
            vector=raw[at : at + width],
        )
    return message


def encode_batch(batch: RowBatch) -> RowChunkBytes:
    return encode_rows(
        batch.ids, batch.company_name, batch.exp_years, batch.english_level, batch.primary_keyword, batch.vectors
    )
