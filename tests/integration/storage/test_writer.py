"""The chunk writer against a real PostgreSQL with pgvector."""

from __future__ import annotations

import threading
import uuid

import numpy as np
import psycopg
import pytest

from airflow_embedding_provider.rows import RowBatch
from airflow_embedding_provider.storage.checkpoint import read_checkpoint
from airflow_embedding_provider.storage.schema import (
    SchemaMismatchError,
    apply_schema,
    ensure_ann_index,
    vector_dimension,
)
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.validation import Rejected

DIM = 8


def _batch(ids: list[str], value: float = 0.5, keyword: str = "Python") -> RowBatch:
    n = len(ids)
    vectors = np.tile(np.arange(DIM, dtype=np.float32) * value, (n, 1))
    return RowBatch(
        ids=ids,
        company_name=["Żabka"] * n,
        exp_years=[3] * n,
        english_level=["upper"] * n,
        primary_keyword=[keyword] * n,
        vectors=vectors,
    )


def _ids(n: int, start: int = 0) -> list[str]:
    return [str(uuid.UUID(int=(0x019B << 112) | (i + start))) for i in range(n)]


@pytest.fixture
def conn(pg_dsn: str):
    with psycopg.connect(pg_dsn) as c:
        apply_schema(c, DIM)
        yield c


def _count(conn: psycopg.Connection, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]


def test_upsert_is_idempotent_and_counts_changes(conn: psycopg.Connection) -> None:
    writer = ChunkWriter(conn, dimension=DIM)
    ids = _ids(5)
    first = writer.write(_batch(ids), checkpoint=ids[-1])
    assert (first.inserted, first.updated, first.unchanged) == (5, 0, 0)
    stamp = conn.execute("SELECT max(updated_at) FROM recruit_metadata").fetchone()
    again = writer.write(_batch(ids), checkpoint=ids[-1])
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 5)
    assert conn.execute("SELECT max(updated_at) FROM recruit_metadata").fetchone() == stamp  # nothing rewritten
    changed = writer.write(_batch(ids[:2], keyword="Go"))
    assert (changed.inserted, changed.updated) == (0, 2)
    vec = writer.write(_batch(ids[2:3], value=3.0))
    assert (vec.inserted, vec.updated) == (0, 1)
    assert _count(conn, "recruit_metadata") == 5 == _count(conn, "recruit_embedding")
    stored = conn.execute("SELECT vector::text FROM recruit_embedding WHERE id = %s", (ids[2],)).fetchone()
    assert stored == ("[" + ",".join(str(int(v) if v.is_integer() else v) for v in np.arange(DIM) * 3.0) + "]",)


@pytest.mark.parametrize(("in_callers_transaction", "rows"), [(False, 6), (True, 6), (True, 1)])
def test_a_row_a_concurrent_writer_commits_first_turns_the_copy_into_an_upsert(
    conn: psycopg.Connection, pg_dsn: str, in_callers_transaction: bool, rows: int
) -> None:
    """The probe finds none of the ids (the other writer has not committed), so the batch is
    COPYed straight in; the COPY waits on the other writer's row, fails with UniqueViolation when
    it commits, and the batch is upserted instead: nothing lost, nothing doubled, nothing
    dead-lettered (a lone row is not "refused"). Either as its own transaction (redone whole) or
    inside a caller's (redone in its savepoint)."""
    ids = _ids(6)
    contested = ids[2]
    batch_ids = ids if rows == 6 else [contested]
    writer = ChunkWriter(conn, dimension=DIM)
    conn.commit()
    if in_callers_transaction:
        conn.execute("SELECT 1")
    with psycopg.connect(pg_dsn) as other:
        other.execute("SELECT 1")  # a transaction is open: the write below stays uncommitted
        ChunkWriter(other, dimension=DIM).write(_batch([contested], keyword="Rust"))
        committer = threading.Timer(1.0, other.commit)
        committer.start()
        try:
            result = writer.write(_batch(batch_ids), checkpoint=batch_ids[-1])
        finally:
            committer.join()
    conn.commit()
    # The other writer's row was there first: this batch updated it to its own version.
    assert (result.inserted, result.updated, result.unchanged, result.rejected) == (rows - 1, 1, 0, 0)
    assert _count(conn, "recruit_metadata") == rows == _count(conn, "recruit_embedding")
    assert _count(conn, "recruit_embedding_dlq") == 0
    keywords = conn.execute("SELECT DISTINCT primary_keyword FROM recruit_metadata").fetchall()
    assert keywords == [("Python",)]
    assert read_checkpoint(conn) == batch_ids[-1]


def test_same_id_twice_in_a_chunk_the_later_wins(conn: psycopg.Connection) -> None:
    writer = ChunkWriter(conn, dimension=DIM)
    ids = _ids(3)
    first = _batch([ids[0], ids[1]], keyword="Java")
    later = _batch([ids[0], ids[2]], keyword="Rust")
    both = RowBatch(
        ids=[*first.ids, *later.ids],
        company_name=[*first.company_name, *later.company_name],
        exp_years=[*first.exp_years, *later.exp_years],
        english_level=[*first.english_level, *later.english_level],
        primary_keyword=[*first.primary_keyword, *later.primary_keyword],
        vectors=np.vstack([first.vectors, later.vectors]),
    )
    result = writer.write(both)
    assert (result.inserted, result.duplicates) == (3, 1)
    assert conn.execute("SELECT primary_keyword FROM recruit_metadata WHERE id = %s", (ids[0],)).fetchone() == ("Rust",)


def test_checkpoint_never_moves_backwards(conn: psycopg.Connection) -> None:
    writer = ChunkWriter(conn, dimension=DIM)
    ids = _ids(10)
    writer.write(_batch(ids[:5]), checkpoint=ids[4])
    writer.write(_batch(ids[:2]), checkpoint=ids[1])
    assert read_checkpoint(conn) == ids[4]
    writer.write(_batch(ids[5:]), checkpoint=ids[9])
    assert read_checkpoint(conn) == ids[9]
    assert _count(conn, "embedding_batch_checkpoint") == 1


def test_rejected_rows_land_in_the_dlq_with_the_chunk(conn: psycopg.Connection) -> None:
    writer = ChunkWriter(conn, dimension=DIM)
    ids = _ids(3)
    bad = Rejected(
        id=None,
        kind="invalid_id",
        message="id 'x' is not a UUID",
        payload={"id": "x", "vector": [1.0], "company_name": None},
    )
    result = writer.write(_batch(ids), [bad], checkpoint=ids[-1], origin={"run_id": "r1"})
    assert result.rejected == 1
    row = conn.execute("SELECT id, error_kind, error_message, payload FROM recruit_embedding_dlq").fetchone()
    assert row is not None
    assert row[:3] == (None, "invalid_id", "id 'x' is not a UUID")
    assert row[3]["id"] == "x" and row[3]["vector"] == [1.0]
    assert row[3]["_origin"] == {"run_id": "r1"}
    assert read_checkpoint(conn) == ids[-1]


def test_a_resolved_dlq_entry_whose_row_is_rejected_again_is_pending_again(conn: psycopg.Connection) -> None:
    writer = ChunkWriter(conn, dimension=DIM)
    bad = Rejected(id=None, kind="invalid_id", message="id 'x' is not a UUID", payload={"id": "x"})
    writer.write(RowBatch.empty(DIM), [bad])
    writer.write(RowBatch.empty(DIM), [bad])  # the same row again: still one entry
    assert conn.execute("SELECT count(*), min(status) FROM recruit_embedding_dlq").fetchone() == (1, "pending")
    conn.execute("UPDATE recruit_embedding_dlq SET status = 'resolved'")
    conn.commit()
    writer.write(RowBatch.empty(DIM), [bad])
    assert conn.execute("SELECT count(*), min(status) FROM recruit_embedding_dlq").fetchone() == (1, "pending")


def test_rows_the_database_refuses_are_isolated_and_the_rest_commits(conn: psycopg.Connection) -> None:
    writer = ChunkWriter(conn, dimension=DIM)
    ids = _ids(10)
    conn.execute("ALTER TABLE recruit_metadata ADD CONSTRAINT no_cobol CHECK (primary_keyword <> 'COBOL')")
    conn.commit()
    batch = _batch(ids)
    keywords = ["COBOL" if i in (3, 7) else "Python" for i in range(10)]
    batch = RowBatch(
        ids=batch.ids,
        company_name=batch.company_name,
        exp_years=batch.exp_years,
        english_level=batch.english_level,
        primary_keyword=keywords,
        vectors=batch.vectors,
    )
    result = writer.write(batch, checkpoint=ids[-1])
    assert (result.inserted, result.rejected, result.refused) == (8, 2, 2)
    assert _count(conn, "recruit_metadata") == 8 == _count(conn, "recruit_embedding")
    rows = conn.execute(
        "SELECT id::text, error_kind, error_message, payload FROM recruit_embedding_dlq ORDER BY id"
    ).fetchall()
    assert [r[0] for r in rows] == [ids[3], ids[7]]
    assert all(r[1] == "database_rejected" for r in rows)
    assert "SQLSTATE 23514" in rows[0][2] and "no_cobol" in rows[0][2]
    assert rows[0][3]["primary_keyword"] == "COBOL" and len(rows[0][3]["vector"]) == DIM
    assert read_checkpoint(conn) == ids[-1]


def test_an_infrastructure_error_is_not_dead_lettered(conn: psycopg.Connection, pg_dsn: str) -> None:
    writer = ChunkWriter(conn, dimension=DIM)
    ids = _ids(3)
    conn.execute("SET lock_timeout = '200ms'")
    conn.commit()
    with psycopg.connect(pg_dsn) as other:
        other.execute("LOCK TABLE recruit_metadata IN ACCESS EXCLUSIVE MODE")  # held until other commits
        with pytest.raises(psycopg.errors.LockNotAvailable):
            writer.write(_batch(ids), checkpoint=ids[-1])
        conn.rollback()
    assert _count(conn, "recruit_metadata") == 0 and _count(conn, "recruit_embedding_dlq") == 0
    assert read_checkpoint(conn) is None


def test_schema_is_idempotent_and_guards_the_dimension(conn: psycopg.Connection) -> None:
    apply_schema(conn, DIM)
    apply_schema(conn, DIM)
    assert vector_dimension(conn, "recruit_embedding") == DIM
    with pytest.raises(SchemaMismatchError, match=r"stores vector\(8\) but the configured dimension is 384"):
        apply_schema(conn, 384)


def test_schema_applied_again_takes_no_table_lock(conn: psycopg.Connection, pg_dsn: str) -> None:
    """A run starting while another session writes must not queue behind it on DDL locks."""
    with psycopg.connect(pg_dsn) as writer:
        writer.execute("LOCK TABLE recruit_embedding_dlq, embedding_batch_checkpoint, embedding_cache_outbox")
        conn.execute("SET lock_timeout = '1s'")
        apply_schema(conn, DIM)  # the schema is current: no ALTER TABLE, no CREATE INDEX
        conn.commit()
        writer.rollback()
    conn.execute("DROP TABLE recruit_embedding_dlq")
    conn.commit()
    apply_schema(conn, DIM)  # a missing table brings the script back
    assert _count(conn, "recruit_embedding_dlq") == 0


def test_ann_index_is_built_after_data_arrives(conn: psycopg.Connection) -> None:
    assert ensure_ann_index(conn) is False  # empty table: ivfflat would learn nothing
    ChunkWriter(conn, dimension=DIM).write(_batch(_ids(50)))
    assert ensure_ann_index(conn) is True
    assert ensure_ann_index(conn) is False
    indexdef = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'recruit_embedding_ivfflat'").fetchone()
    assert indexdef is not None and "ivfflat" in indexdef[0] and "lists='1'" in indexdef[0]


def _ann_indexes(conn: psycopg.Connection) -> dict[str, str]:
    rows = conn.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'recruit_embedding' AND indexname <> "
        "'recruit_embedding_pkey'"
    ).fetchall()
    return dict(rows)


def test_hnsw_option_builds_hnsw_and_switching_keeps_one_ann_index(conn: psycopg.Connection) -> None:
    with pytest.raises(ValueError, match="one of ivfflat, hnsw, got 'diskann'"):
        ensure_ann_index(conn, method="diskann")
    assert ensure_ann_index(conn, method="hnsw") is False  # empty table: built after the first load
    ChunkWriter(conn, dimension=DIM).write(_batch(_ids(50)))
    assert ensure_ann_index(conn) is True
    assert set(_ann_indexes(conn)) == {"recruit_embedding_ivfflat"}
    # Switching the setting builds the other index and drops the first, in one transaction.
    assert ensure_ann_index(conn, method="hnsw") is True
    indexes = _ann_indexes(conn)
    assert set(indexes) == {"recruit_embedding_hnsw"}
    assert "USING hnsw (vector vector_l2_ops)" in indexes["recruit_embedding_hnsw"]
    assert ensure_ann_index(conn, method="hnsw") is False
    # The index is kept up to date by later writes, and nearest-neighbour search can use it.
    ChunkWriter(conn, dimension=DIM).write(_batch(_ids(10, start=50), value=2.0))
    conn.execute("SET enable_seqscan = off")
    query = "[" + ",".join(str(2.0 * i) for i in range(DIM)) + "]"
    plan = "\n".join(
        r[0] for r in conn.execute("EXPLAIN SELECT id FROM recruit_embedding ORDER BY vector <-> %s LIMIT 3", (query,))
    )
    assert "recruit_embedding_hnsw" in plan
    nearest = conn.execute("SELECT id::text FROM recruit_embedding ORDER BY vector <-> %s LIMIT 1", (query,)).fetchone()
    assert nearest is not None and nearest[0] in _ids(10, start=50)
    conn.rollback()
