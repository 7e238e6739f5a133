"""``storage/copy_binary.py``: the COPY BINARY buffers, read back from a real PostgreSQL bit for bit."""

from __future__ import annotations

import struct
import uuid

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from airflow_embedding_provider.rows import RowBatch
from airflow_embedding_provider.storage.copy_binary import (
    HEADER,
    TRAILER,
    embedding_copy_buffer,
    metadata_copy_buffer,
    uuid_bytes,
)
from airflow_embedding_provider.validation import INT4_MAX

DIM = 5


def _batch() -> RowBatch:
    ids = [str(uuid.UUID(int=(0x019B << 112) | i)) for i in range(4)]
    vectors = np.array(
        [
            [0.0, -0.0, 1.5, -2.25, 3.4028235e38],
            [1e-45, -1e-45, 0.1, 0.2, 0.3],  # subnormals survive
            [1.0, 2.0, 3.0, 4.0, 5.0],
            [-1.0, -2.0, -3.0, -4.0, -5.0],
        ],
        dtype=np.float32,
    )
    return RowBatch(
        ids=ids,
        company_name=["Müller & Söhne GmbH", None, "", "東京ソフトウェア株式会社"],
        exp_years=[0, None, INT4_MAX, 7],
        english_level=[None, "upper", "fluent", ""],
        primary_keyword=["C++", "Go", None, "x" * 5000],
        vectors=vectors,
    )


@pytest.fixture
def conn(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute(
            "CREATE TABLE meta (id uuid, company_name text, exp_years int4, english_level text, primary_keyword text)"
        )
        c.execute(f"CREATE TABLE emb (id uuid, vector vector({DIM}))")
        register_vector(c)
        yield c


def test_metadata_rows_read_back_exactly(conn: psycopg.Connection) -> None:
    batch = _batch()
    with (
        conn.cursor() as cur,
        cur.copy(
            "COPY meta (id, company_name, exp_years, english_level, primary_keyword) FROM STDIN (FORMAT BINARY)"
        ) as copy,
    ):
        copy.write(metadata_copy_buffer(batch))
    rows = conn.execute(
        "SELECT id::text, company_name, exp_years, english_level, primary_keyword FROM meta ORDER BY id"
    ).fetchall()
    assert rows == [
        (batch.ids[i], batch.company_name[i], batch.exp_years[i], batch.english_level[i], batch.primary_keyword[i])
        for i in range(len(batch))
    ]


def test_vectors_read_back_bit_for_bit(conn: psycopg.Connection) -> None:
    batch = _batch()
    with conn.cursor() as cur, cur.copy("COPY emb (id, vector) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(embedding_copy_buffer(batch.ids, batch.vectors))
    rows = conn.execute("SELECT id::text, vector FROM emb ORDER BY id").fetchall()
    assert [r[0] for r in rows] == list(batch.ids)
    stored = np.stack([np.asarray(r[1].to_numpy(), dtype=np.float32) for r in rows])
    assert stored.tobytes() == batch.vectors.tobytes()  # -0.0 and subnormals included


def test_an_empty_batch_is_a_valid_stream_of_no_rows(conn: psycopg.Connection) -> None:
    empty = RowBatch.empty(DIM)
    assert embedding_copy_buffer(empty.ids, empty.vectors) == HEADER + TRAILER
    assert metadata_copy_buffer(empty) == HEADER + TRAILER
    with conn.cursor() as cur, cur.copy("COPY emb (id, vector) FROM STDIN (FORMAT BINARY)") as copy:
        copy.write(HEADER + TRAILER)
    assert conn.execute("SELECT count(*) FROM emb").fetchone() == (0,)


def test_an_embedding_row_has_the_fixed_layout() -> None:
    batch = _batch()
    buffer = embedding_copy_buffer(batch.ids, batch.vectors)
    row = 2 + 4 + 16 + 4 + 2 + 2 + 4 * DIM
    assert len(buffer) == len(HEADER) + len(batch) * row + len(TRAILER)
    first = buffer[len(HEADER) : len(HEADER) + row]
    fields, id_len = struct.unpack("!hi", first[:6])
    assert (fields, id_len) == (2, 16)
    assert first[6:22] == uuid.UUID(batch.ids[0]).bytes
    vec_len, dim, unused = struct.unpack("!ihh", first[22:30])
    assert (vec_len, dim, unused) == (4 + 4 * DIM, DIM, 0)
    assert np.frombuffer(first[30:], dtype=">f4").tobytes() == batch.vectors[0].astype(">f4").tobytes()


def test_uuid_bytes_decode_the_batch_at_once() -> None:
    ids = [str(uuid.uuid4()) for _ in range(3)]
    assert uuid_bytes(ids).tobytes() == b"".join(uuid.UUID(i).bytes for i in ids)
    with pytest.raises(ValueError, match="canonical UUID strings"):
        uuid_bytes([uuid.uuid4().hex])  # 32 characters, no hyphens


def test_dimensions_above_pgvectors_limit_are_refused() -> None:
    with pytest.raises(ValueError, match="above pgvector's 16000"):
        embedding_copy_buffer([str(uuid.uuid4())], np.zeros((1, 16001), dtype=np.float32))


def test_exp_years_beyond_int4_cannot_be_encoded() -> None:
    """Validation keeps such rows out; the encoder refuses rather than wrap around."""
    batch = _batch()
    too_big = RowBatch(
        ids=batch.ids[:1],
        company_name=[None],
        exp_years=[INT4_MAX + 1],
        english_level=[None],
        primary_keyword=[None],
        vectors=batch.vectors[:1],
    )
    with pytest.raises(OverflowError):
        metadata_copy_buffer(too_big)
