from __future__ import annotations

import struct

import numpy as np
import pytest

from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.codec import encode_rows, parse_chunk


def _columns(n: int = 5, dim: int = 8):
    rng = np.random.default_rng(1)
    ids = [f"00000000-0000-7000-8000-{i:012d}" for i in range(n)]
    return (
        ids,
        ["Acme", None, "Żabka", "", "東京"],
        [1, None, 0, 2**31 - 1, 3],
        ["upper", "fluent", None, "basic", "pre"],
        ["Python", "Go", "QA", None, ".NET"],
        rng.standard_normal((n, dim)).astype(np.float32),
    )


def test_bytes_view_is_the_public_packed_encoding() -> None:
    ids, company, years, english, keyword, vectors = _columns()
    view = encode_rows(ids, company, years, english, keyword, vectors).SerializeToString()
    public = embedding_pb2.RowChunk(
        rows=[
            embedding_pb2.RecruitRow(
                id=ids[i],
                company_name=company[i],
                exp_years=years[i],
                english_level=english[i],
                primary_keyword=keyword[i],
                vector=vectors[i].tolist(),
            )
            for i in range(len(ids))
        ]
    ).SerializeToString()
    assert view == public


def test_roundtrip_is_bit_exact_and_keeps_nulls() -> None:
    ids, company, years, english, keyword, vectors = _columns()
    vectors[1, 3] = np.float32(1e-45)  # a subnormal survives
    chunk = parse_chunk(encode_rows(ids, company, years, english, keyword, vectors).SerializeToString())
    assert chunk.ids == ids
    assert chunk.company_name == company  # None stays None, "" stays ""
    assert chunk.exp_years == years
    assert chunk.english_level == english and chunk.primary_keyword == keyword
    decoded = np.frombuffer(b"".join(chunk.vectors), dtype="<f4").reshape(vectors.shape)
    assert decoded.tobytes() == vectors.astype("<f4").tobytes()


def test_public_message_reads_the_same_floats() -> None:
    ids, company, years, english, keyword, vectors = _columns()
    data = encode_rows(ids, company, years, english, keyword, vectors).SerializeToString()
    public = embedding_pb2.RowChunk.FromString(data)
    got = np.array([list(r.vector) for r in public.rows], dtype=np.float32)
    assert got.tobytes() == vectors.tobytes()
    assert not public.rows[1].HasField("company_name")


def test_unpacked_floats_from_another_encoder_are_not_lost() -> None:
    # Field 6 as one fixed32 record a float (legal, unpacked): the bytes view cannot take it.
    row = b"\x0a\x04abcd" + b"".join(b"\x35" + struct.pack("<f", v) for v in (1.5, -2.0, 3.25))
    chunk_bytes = b"\x0a" + bytes([len(row)]) + row
    chunk = parse_chunk(chunk_bytes)
    assert chunk.ids == ["abcd"]
    assert np.frombuffer(chunk.vectors[0], dtype="<f4").tolist() == [1.5, -2.0, 3.25]


def _reference_encode(ids, company, years, english, keyword, vectors):
    """The per-row form ``encode_rows`` replaced: one ``RecruitRowBytes`` a row, then the list."""
    from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RecruitRowBytes, RowChunkBytes

    matrix = np.ascontiguousarray(vectors, dtype="<f4")
    return RowChunkBytes(
        rows=[
            RecruitRowBytes(
                id=ids[i],
                company_name=company[i],
                exp_years=years[i],
                english_level=english[i],
                primary_keyword=keyword[i],
                vector=matrix[i].tobytes(),
            )
            for i in range(len(ids))
        ]
    )


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_encode_rows_gives_the_bytes_of_the_per_row_encoding(rows: int) -> None:
    ids, company, years, english, keyword, vectors = _columns()
    years = [-(2**31), None, 0, 2**31 - 1, 3]  # the int32 bounds
    columns = (ids[:rows], company[:rows], years[:rows], english[:rows], keyword[:rows], vectors[:rows])
    assert encode_rows(*columns).SerializeToString() == _reference_encode(*columns).SerializeToString()
    strided = np.asfortranarray(vectors[:rows])  # any matrix layout encodes the same
    assert encode_rows(*columns[:5], strided).SerializeToString() == _reference_encode(*columns).SerializeToString()


def test_decode_tells_unset_from_empty_and_zero() -> None:
    """An unset optional reads as "" or 0 in protobuf: decoding gives None only where it is unset."""
    ids = [f"00000000-0000-7000-8000-{i:012d}" for i in range(4)]
    company = ["", None, "Acme", ""]
    years = [0, None, 0, 5]
    english = [None, "", "upper", None]
    keyword = ["", "", None, "Go"]
    vectors = np.ones((4, 3), dtype=np.float32)
    chunk = parse_chunk(encode_rows(ids, company, years, english, keyword, vectors).SerializeToString())
    assert (chunk.company_name, chunk.exp_years, chunk.english_level, chunk.primary_keyword) == (
        company,
        years,
        english,
        keyword,
    )
    assert len(parse_chunk(b"")) == 0
