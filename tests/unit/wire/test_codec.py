from __future__ import annotations

import struct

import numpy as np

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
