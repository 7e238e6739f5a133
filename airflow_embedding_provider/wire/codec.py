"""Encode and decode ``RowChunk`` messages with vectors as raw float32 bytes.

The public contract declares ``repeated float vector = 6`` (packed). We parse and build messages
through ``RowChunkBytes``, a view with ``bytes vector = 6`` that is identical on the wire, so a
vector crosses the Python boundary as one bytes object and never float by float.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from airflow_embedding_provider.rows import FloatMatrix, RowBatch
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RecruitRowBytes, RowChunkBytes

FLOAT32_LE = np.dtype("<f4")


@dataclass(frozen=True)
class WireChunk:
    """A received chunk, still unvalidated: values as the peer sent them.

    ``vectors`` holds each row's raw little-endian float32 bytes; it is up to validation to
    check their length against the configured dimension.
    """

    ids: list[str]
    company_name: list[str | None]
    exp_years: list[int | None]
    english_level: list[str | None]
    primary_keyword: list[str | None]
    vectors: list[bytes]

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
        )


def _vector_bytes(row: RecruitRowBytes) -> bytes:
    if row.vector or not row.ListFields():
        return row.vector
    # An encoder may legally send a repeated float unpacked (one fixed32 record a float). The
    # bytes view then keeps those records as unknown fields and sees no vector; parse that rare
    # row through the public message instead of losing its vector.
    public = embedding_pb2.RecruitRow.FromString(row.SerializeToString())
    return np.asarray(public.vector, dtype=FLOAT32_LE).tobytes()


def decode_chunk(message: RowChunkBytes) -> WireChunk:
    rows = message.rows
    # Column by column, asking ``HasField`` only of an empty value (an unset optional reads as the
    # empty value): one attribute read a field for the common row, half the cost of always asking.
    return WireChunk(
        ids=[r.id for r in rows],
        company_name=[v if (v := r.company_name) or r.HasField("company_name") else None for r in rows],
        exp_years=[n if (n := r.exp_years) or r.HasField("exp_years") else None for r in rows],
        english_level=[v if (v := r.english_level) or r.HasField("english_level") else None for r in rows],
        primary_keyword=[v if (v := r.primary_keyword) or r.HasField("primary_keyword") else None for r in rows],
        vectors=[b if (b := r.vector) else _vector_bytes(r) for r in rows],
    )


def parse_chunk(data: bytes) -> WireChunk:
    """Deserialize one serialized ``RowChunk``."""
    return decode_chunk(RowChunkBytes.FromString(data))


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
    return RowChunkBytes(
        rows=[
            RecruitRowBytes(
                id=ids[i],
                company_name=company_name[i],
                exp_years=exp_years[i],
                english_level=english_level[i],
                primary_keyword=primary_keyword[i],
                vector=matrix[i].tobytes(),
            )
            for i in range(len(ids))
        ]
    )


def encode_batch(batch: RowBatch) -> RowChunkBytes:
    return encode_rows(
        batch.ids, batch.company_name, batch.exp_years, batch.english_level, batch.primary_keyword, batch.vectors
    )
