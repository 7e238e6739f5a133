"""Binary COPY streams for the ceiling measurement, encoded ahead of time (never timed).

The embedding rows use the engine's own numpy encoder; metadata rows are variable-length text, so
they are encoded here with ``struct``, which is slow but runs before the clock starts.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence

from airflow_embedding_provider.rows import FloatMatrix
from airflow_embedding_provider.storage.copy_binary import HEADER, TRAILER, embedding_copy_buffer

__all__ = ["HEADER", "TRAILER", "embedding_rows", "metadata_rows"]

_NULL = struct.pack("!i", -1)
_INT4 = struct.Struct("!ii")  # length 4, value


def _text(value: str | None) -> bytes:
    if value is None:
        return _NULL
    data = value.encode()
    return struct.pack("!i", len(data)) + data


def metadata_rows(
    ids: Sequence[str],
    company_name: Sequence[str | None],
    exp_years: Sequence[int | None],
    english_level: Sequence[str | None],
    primary_keyword: Sequence[str | None],
) -> bytes:
    """Tuples ``(id uuid, company_name text, exp_years int4, english_level text, primary_keyword
    text)`` without the stream's header and trailer, so that blocks can be concatenated."""
    out = bytearray()
    for i, row_id in enumerate(ids):
        out += b"\x00\x05\x00\x00\x00\x10" + uuid.UUID(row_id).bytes
        out += _text(company_name[i])
        years = exp_years[i]
        out += _NULL if years is None else _INT4.pack(4, years)
        out += _text(english_level[i])
        out += _text(primary_keyword[i])
    return bytes(out)


def embedding_rows(ids: Sequence[str], vectors: FloatMatrix) -> bytes:
    """Tuples ``(id uuid, vector vector(dim))`` without header and trailer."""
    return embedding_copy_buffer(ids, vectors)[len(HEADER) : -len(TRAILER)]
