"""The batch encoders of ``storage/copy_binary.py`` give the same bytes as a plain per-row encoder
(``struct.pack`` a field at a time, the form they replaced) on awkward rows; PostgreSQL reading
those bytes back is tested in tests/integration/storage/test_copy_binary.py."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence

import numpy as np
import pytest

from airflow_embedding_provider.rows import RowBatch
from airflow_embedding_provider.storage.copy_binary import (
    HEADER,
    TRAILER,
    embedding_copy_buffer,
    embedding_copy_view,
    metadata_copy_buffer,
)
from airflow_embedding_provider.validation import INT4_MAX

INT4_MIN = -(2**31)


def _reference_text(value: str | None) -> bytes:
    if value is None:
        return struct.pack("!i", -1)
    data = value.encode("utf-8")
    return struct.pack("!i", len(data)) + data


def _reference_metadata(batch: RowBatch, hashes: Sequence[int] | None) -> bytes:
    out = [HEADER]
    for i, row_id in enumerate(batch.ids):
        out.append(struct.pack("!hi", 5 if hashes is None else 6, 16) + uuid.UUID(row_id).bytes)
        out.append(_reference_text(batch.company_name[i]))
        years = batch.exp_years[i]
        out.append(struct.pack("!i", -1) if years is None else struct.pack("!ii", 4, years))
        out.append(_reference_text(batch.english_level[i]))
        out.append(_reference_text(batch.primary_keyword[i]))
        if hashes is not None:
            out.append(struct.pack("!iq", 8, hashes[i]))
    out.append(TRAILER)
    return b"".join(out)


def _reference_embedding(batch: RowBatch) -> bytes:
    out = [HEADER]
    for i, row_id in enumerate(batch.ids):
        vector = batch.vectors[i]
        out.append(struct.pack("!hi", 2, 16) + uuid.UUID(row_id).bytes)
        out.append(struct.pack("!ihh", 4 + 4 * len(vector), len(vector), 0))
        out.append(struct.pack(f"!{len(vector)}f", *vector.tolist()))
    out.append(TRAILER)
    return b"".join(out)


def _awkward(dim: int = 6) -> RowBatch:
    """NULLs in every nullable column, empty strings, non-ASCII and long text, the int4 bounds,
    repeated values (encoded once), -0.0, subnormals and the largest float32."""
    names = ["Müller & Söhne GmbH", None, "", "東京ソフトウェア株式会社", "Müller & Söhne GmbH", "😀 emoji", "x" * 5000]
    years = [0, None, INT4_MAX, INT4_MIN, 7, 0, None]
    levels = [None, "upper", "fluent", "", "upper", None, "ñ"]
    keywords = ["C++", "Go", None, "x" * 5000, "Go", "", "Ünïcode"]
    n = len(names)
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors[0, 0] = -0.0
    vectors[0, 1] = np.float32(1e-45)  # a subnormal
    vectors[0, 2] = np.finfo(np.float32).max
    vectors[1, 0] = -np.finfo(np.float32).tiny
    ids = [str(uuid.UUID(int=(0x019B << 112) | (i * 0x1F3D5B79))) for i in range(n)]
    return RowBatch(ids, names, years, levels, keywords, vectors)


def _hashes(n: int) -> list[int]:
    return [0, -1, 2**63 - 1, -(2**63), 123456789, -987654321, 42][:n]


@pytest.mark.parametrize("hashed", [False, True])
def test_metadata_stream_equals_the_per_row_encoding(hashed: bool) -> None:
    batch = _awkward()
    hashes = _hashes(len(batch)) if hashed else None
    got = metadata_copy_buffer(batch, None if hashes is None else np.array(hashes, dtype=np.int64))
    assert got == _reference_metadata(batch, hashes)


@pytest.mark.parametrize("rows", [0, 1, 2])
def test_small_batches_equal_the_per_row_encoding(rows: int) -> None:
    batch = _awkward().slice(0, rows)
    hashes = _hashes(rows)
    assert metadata_copy_buffer(batch) == _reference_metadata(batch, None)
    assert metadata_copy_buffer(batch, np.array(hashes, dtype=np.int64)) == _reference_metadata(batch, hashes)
    assert embedding_copy_buffer(batch.ids, batch.vectors) == _reference_embedding(batch)


def test_embedding_stream_equals_the_per_row_encoding_and_its_view() -> None:
    batch = _awkward(dim=384)
    expected = _reference_embedding(batch)
    assert embedding_copy_buffer(batch.ids, batch.vectors) == expected
    view = embedding_copy_view(batch.ids, batch.vectors)
    assert view.nbytes == len(view) == len(expected)  # a byte view: psycopg's COPY takes its len
    assert view.tobytes() == expected


def test_embedding_stream_of_a_non_contiguous_matrix() -> None:
    batch = _awkward(dim=8)
    strided = np.asfortranarray(batch.vectors)
    assert embedding_copy_buffer(batch.ids, strided) == _reference_embedding(batch)


def test_values_the_columns_cannot_hold_are_refused_as_before() -> None:
    batch = _awkward()
    for years in (INT4_MAX + 1, INT4_MIN - 1):
        with pytest.raises(OverflowError):
            metadata_copy_buffer(RowBatch(batch.ids[:1], [None], [years], [None], [None], batch.vectors[:1]))
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate is not UTF-8
        metadata_copy_buffer(RowBatch(batch.ids[:1], ["\ud800"], [1], [None], [None], batch.vectors[:1]))
    with pytest.raises(ValueError, match="canonical UUID strings"):
        metadata_copy_buffer(RowBatch([uuid.uuid4().hex], [None], [1], [None], [None], batch.vectors[:1]))
