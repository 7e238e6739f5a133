"""The replay core against a real PostgreSQL and a real AI server (no Airflow run needed)."""

from __future__ import annotations

import functools
import json
import uuid

import numpy as np
import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
from airflow_embedding_provider.replay import replay_dlq
from airflow_embedding_provider.storage.dlq import DlqScope
from airflow_embedding_provider.storage.outbox import CacheRequest
from airflow_embedding_provider.storage.schema import apply_schema
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.validation import validate_chunk
from airflow_embedding_provider.wire.codec import WireChunk
from dev.verify import stored_rows, table_digest
from tests.conftest import embedding_hook

DIM = 8
refetch_row = GrpcEmbeddingHook.fetch_row


def _uid(i: int) -> str:
    return str(uuid.UUID(int=(0x019B << 112) | i))


def _chunk(ids: list[str], vectors: list[bytes], keyword: str = "Python") -> WireChunk:
    n = len(ids)
    return WireChunk(ids, ["EPAM"] * n, [2] * n, ["upper"] * n, [keyword] * n, vectors)


def _vec(i: int, dim: int = DIM) -> bytes:
    return (np.arange(dim, dtype="<f4") + i / 7).tobytes()


def _dead_letter(conn: psycopg.Connection, chunk: WireChunk, dimension: int) -> None:
    """Dead-letter every row of ``chunk`` as an ingest configured with ``dimension`` does."""
    batch, rejected = validate_chunk(chunk, dimension)
    assert len(batch) == 0
    # An ingest of its own: the writer's staging tables live as long as the session.
    with psycopg.connect(conn.info.dsn) as ingest:
        ChunkWriter(ingest, dimension=dimension).write(batch, rejected, origin={"run_id": "ingest"})


def _ingest(dsn: str, chunk: WireChunk, dimension: int = DIM) -> None:
    """An ingest of ``chunk`` in a session and transaction of its own: valid rows stored, the others
    (and rows the database refuses) dead-lettered, all with that transaction's ``now()``."""
    batch, rejected = validate_chunk(chunk, dimension)
    with psycopg.connect(dsn, autocommit=True) as ingest:
        ChunkWriter(ingest, dimension=dimension).write(batch, rejected, origin={"run_id": "ingest"})


def _forbid_cobol(conn: psycopg.Connection, forbid: bool = True) -> None:
    """A constraint that makes the database refuse COBOL rows (``database_rejected``), or its removal:
    a failure that an operator can fix, after which the stored payload becomes valid."""
    if forbid:
        conn.execute("ALTER TABLE recruit_metadata ADD CONSTRAINT no_cobol CHECK (primary_keyword <> 'COBOL')")
    else:
        conn.execute("ALTER TABLE recruit_metadata DROP CONSTRAINT no_cobol")
    conn.commit()


def _written_at(conn: psycopg.Connection, row_id: str) -> tuple:
    """(metadata ``updated_at``, embedding ``updated_at``, the row's DLQ entries' ``created_at``)."""
    row = conn.execute(
        "SELECT m.updated_at, e.updated_at, (SELECT array_agg(created_at ORDER BY dlq_id) FROM recruit_embedding_dlq "
        "WHERE id = m.id) FROM recruit_metadata m JOIN recruit_embedding e USING (id) WHERE m.id = %s",
        (row_id,),
    ).fetchone()
    assert row is not None
    return tuple(row)


def _dlq(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT id::text, status, attempts, error_kind, error_message FROM recruit_embedding_dlq ORDER BY dlq_id"
    ).fetchall()


@pytest.fixture
def conn(pg_dsn: str):
    with psycopg.connect(pg_dsn) as c:
        apply_schema(c, DIM)
        yield c


def test_pages_settle_each_entry_once_and_a_rerun_changes_nothing(conn: psycopg.Connection) -> None:
    ids = [_uid(i) for i in range(7)]
    vectors = [_vec(i) for i in range(7)]
    vectors[3] = np.full(DIM, np.nan, dtype="<f4").tobytes()
    # Rejected by a stricter past configuration: a NUL byte rule cannot be relaxed, so simulate one
    # that can by dead-lettering correct rows under another dimension's name.
    _dead_letter(conn, _chunk(ids, [v + b"\0\0\0\0" for v in vectors]), DIM)
    conn.execute(
        "UPDATE recruit_embedding_dlq SET payload = jsonb_set(payload, '{vector}', %s)",
        (json.dumps([0.0] * DIM),),
    )
    for row_id, raw in zip(ids, vectors, strict=True):
        values = [v if np.isfinite(v) else str(v) for v in np.frombuffer(raw, "<f4").astype(float).tolist()]
        conn.execute(
            "UPDATE recruit_embedding_dlq SET payload = jsonb_set(payload, '{vector}', %s) WHERE id = %s",
            (json.dumps(values), row_id),
        )
    conn.commit()

    writer = ChunkWriter(conn, dimension=DIM, cache_request=CacheRequest("recruit", "replay-test"))
    stats = replay_dlq(conn, writer, dimension=DIM, batch_size=2)
    assert stats.as_dict() == {
        "selected": 7,
        "resolved": 6,
        "superseded": 0,
        "still_failing": 1,
        "refetched": 0,
        "inserted": 6,
        "updated": 0,
        "unchanged": 0,
        "by_reason": {"non_finite_vector": 1},
        "resolved_by_reason": {"dimension_mismatch": 6},
    }
    stored = stored_rows(conn)
    assert sorted(stored) == sorted(ids[:3] + ids[4:])
    assert all(stored[i][1] == vectors[int(i[-1])] for i in stored)
    dlq = _dlq(conn)
    assert [r[:4] for r in dlq] == [
        (i, "pending", 1, "non_finite_vector") if i == ids[3] else (i, "resolved", 1, "dimension_mismatch") for i in ids
    ]
    assert "replayed from the stored payload" in dlq[3][4]
    assert conn.execute("SELECT target, source FROM embedding_cache_outbox").fetchall() == [("recruit", "replay-test")]
    conn.commit()  # end the reads' transaction: a replay commits page by page

    again = replay_dlq(conn, writer, dimension=DIM)
    assert (again.selected, again.resolved, again.still_failing) == (1, 0, 1)
    assert [r[:3] for r in _dlq(conn)][3] == (ids[3], "pending", 2)
    conn.commit()
    scoped = replay_dlq(conn, writer, dimension=DIM, scope=DlqScope(error_kinds=("dimension_mismatch",)))
    assert scoped.selected == 0
    conn.execute("SELECT 1")
    with pytest.raises(ValueError, match="not inside a transaction"):
        replay_dlq(conn, writer, dimension=DIM)


def test_a_row_the_database_refuses_stays_pending_and_the_rest_is_stored(conn: psycopg.Connection) -> None:
    ids = [_uid(i) for i in range(4)]
    _dead_letter(conn, _chunk(ids, [_vec(i, 16) for i in range(4)]), DIM)
    conn.execute(
        "UPDATE recruit_embedding_dlq SET payload = jsonb_set(payload, '{primary_keyword}', '\"COBOL\"') WHERE id = %s",
        (ids[2],),
    )
    conn.commit()
    # The configuration is fixed: the tables are re-created at dimension 16.
    conn.execute("DROP TABLE recruit_embedding, recruit_metadata")
    conn.commit()
    apply_schema(conn, 16)
    conn.execute("ALTER TABLE recruit_metadata ADD CONSTRAINT no_cobol CHECK (primary_keyword <> 'COBOL')")
    conn.commit()

    stats = replay_dlq(conn, ChunkWriter(conn, dimension=16), dimension=16)
    assert (stats.selected, stats.resolved, stats.still_failing) == (4, 3, 1)
    assert stats.by_reason == {"database_rejected": 1}
    assert sorted(stored_rows(conn)) == [ids[0], ids[1], ids[3]]
    refused = [r for r in _dlq(conn) if r[0] == ids[2]]
    assert len(refused) == 1 and refused[0][1:4] == ("pending", 1, "database_rejected")
    assert 'violates check constraint "no_cobol"' in refused[0][4] and "SQLSTATE 23514" in refused[0][4]


def test_delete_resolved_removes_the_entries(conn: psycopg.Connection) -> None:
    ids = [_uid(i) for i in range(2)]
    _dead_letter(conn, _chunk(ids, [b"\x01\x02\x03", _vec(1, 4)]), DIM)
    conn.execute(
        "UPDATE recruit_embedding_dlq SET payload = jsonb_set(payload, '{vector}', %s) WHERE id = %s",
        (json.dumps(np.frombuffer(_vec(1), "<f4").astype(float).tolist()), ids[1]),
    )
    conn.commit()
    stats = replay_dlq(conn, ChunkWriter(conn, dimension=DIM), dimension=DIM, delete_resolved=True)
    assert (stats.resolved, stats.still_failing) == (1, 1)
    assert [r[:4] for r in _dlq(conn)] == [(ids[0], "pending", 1, "bad_vector_bytes")]


def test_a_stale_payload_never_overwrites_a_version_stored_after_it(conn: psycopg.Connection, pg_dsn: str) -> None:
    fresh, update = _uid(1), _uid(2)
    # Sunday: `update` is stored.
    _ingest(pg_dsn, _chunk([update], [_vec(20)]))
    _forbid_cobol(conn)
    # Monday: the AI server sends X for both ids; the database refuses X, which goes to the DLQ.
    _ingest(pg_dsn, _chunk([fresh, update], [_vec(1), _vec(2)], keyword="COBOL"))
    # Tuesday: the corrected X' is stored: `fresh` as a new row (COPY: updated_at from the column
    # default), `update` with only its vector changed (its metadata's updated_at stays Sunday's).
    _ingest(pg_dsn, _chunk([fresh, update], [_vec(11), _vec(12)]))
    meta_at, vector_at, (dead_at,) = _written_at(conn, update)
    assert meta_at < dead_at < vector_at
    meta_at, vector_at, (dead_at,) = _written_at(conn, fresh)
    assert dead_at < meta_at == vector_at
    # Wednesday: the constraint is dropped and the DLQ replayed from the stored payloads.
    _forbid_cobol(conn, False)
    x_prime = {fresh: (("EPAM", 2, "upper", "Python"), _vec(11)), update: (("EPAM", 2, "upper", "Python"), _vec(12))}
    assert stored_rows(conn) == x_prime
    digest = table_digest(conn)
    conn.commit()

    # Stored values are compared as stored: the replaying session's time zone plays no part.
    with psycopg.connect(pg_dsn, autocommit=True, options="-c TimeZone=Pacific/Kiritimati") as replay:
        writer = ChunkWriter(replay, dimension=DIM, cache_request=CacheRequest("recruit", "replay-test"))
        stats = replay_dlq(replay, writer, dimension=DIM)
        assert stats.as_dict() == {
            "selected": 2,
            "resolved": 0,
            "superseded": 2,
            "still_failing": 0,
            "refetched": 0,
            "inserted": 0,
            "updated": 0,
            "unchanged": 0,
            "by_reason": {},
            "resolved_by_reason": {},
        }
        assert stored_rows(conn) == x_prime
        dlq = _dlq(conn)
        assert [r[:4] for r in dlq] == [
            (fresh, "superseded", 1, "database_rejected"),
            (update, "superseded", 1, "database_rejected"),
        ]
        # Nothing changed, so no cache invalidation is requested.
        assert conn.execute("SELECT count(*) FROM embedding_cache_outbox").fetchone() == (0,)
        conn.commit()

        again = replay_dlq(replay, writer, dimension=DIM)
        assert (again.selected, again.resolved, again.superseded, again.still_failing) == (0, 0, 0, 0)
    assert table_digest(conn) == digest
    assert _dlq(conn) == dlq


def test_an_entry_newer_than_the_stored_row_is_replayed(conn: psycopg.Connection, pg_dsn: str) -> None:
    row = _uid(3)
    _ingest(pg_dsn, _chunk([row], [_vec(30)]))  # Sunday: stored
    _forbid_cobol(conn)
    # Monday and Tuesday: two updates of the row, both refused: two entries, newest last.
    _ingest(pg_dsn, _chunk([row], [_vec(31)], keyword="COBOL"))
    _ingest(pg_dsn, _chunk([row], [_vec(32)], keyword="COBOL"))
    meta_at, vector_at, (monday, tuesday) = _written_at(conn, row)
    assert meta_at == vector_at < monday < tuesday
    _forbid_cobol(conn, False)

    # One entry a page: Monday's payload is written first, and that write (a moment ago) must not
    # count as newer than Tuesday's entry, whose payload is the later version.
    stats = replay_dlq(conn, ChunkWriter(conn, dimension=DIM), dimension=DIM, batch_size=1)
    assert stats.as_dict() == {
        "selected": 2,
        "resolved": 2,
        "superseded": 0,
        "still_failing": 0,
        "refetched": 0,
        "inserted": 0,
        "updated": 2,
        "unchanged": 0,
        "by_reason": {},
        "resolved_by_reason": {"database_rejected": 2},
    }
    assert stored_rows(conn) == {row: (("EPAM", 2, "upper", "COBOL"), _vec(32))}
    assert [r[:3] for r in _dlq(conn)] == [(row, "resolved", 1), (row, "resolved", 1)]


def test_an_entry_whose_id_is_not_stored_is_replayed(conn: psycopg.Connection, pg_dsn: str) -> None:
    row, other = _uid(4), _uid(5)
    _forbid_cobol(conn)
    _ingest(pg_dsn, _chunk([row, "not-a-uuid"], [_vec(4), _vec(5)], keyword="COBOL"))
    # Another id stored after the entries: the guard looks at each entry's own id only.
    _ingest(pg_dsn, _chunk([other], [_vec(6)]))
    _forbid_cobol(conn, False)

    stats = replay_dlq(conn, ChunkWriter(conn, dimension=DIM), dimension=DIM)
    assert stats.as_dict() == {
        "selected": 2,
        "resolved": 1,
        "superseded": 0,
        "still_failing": 1,
        "refetched": 0,
        "inserted": 1,
        "updated": 0,
        "unchanged": 0,
        "by_reason": {"invalid_id": 1},
        "resolved_by_reason": {"database_rejected": 1},
    }
    stored = stored_rows(conn)
    assert stored[row] == (("EPAM", 2, "upper", "COBOL"), _vec(4)) and sorted(stored) == [row, other]
    # The entry without a valid id cannot be stored: it stays pending as before.
    assert {r[:4] for r in _dlq(conn)} == {
        (None, "pending", 1, "invalid_id"),
        (row, "resolved", 1, "database_rejected"),
    }


def test_refetch_row_finds_the_servers_version(
    monkeypatch: pytest.MonkeyPatch, ai_server: str, sample_dataset: EmbeddingDataset
) -> None:
    hook = embedding_hook(monkeypatch, ai_server, "embedding_grpc_replay", timeout=10)
    try:
        for i in (0, 1, 1500, len(sample_dataset) - 1):
            row = refetch_row(hook, sample_dataset.ids[i].upper())
            assert row is not None and row.ids == [sample_dataset.ids[i]]
            assert row.vectors == [sample_dataset.vectors[i].astype("<f4").tobytes()]
            assert row.primary_keyword == [sample_dataset.primary_keyword[i]]
        missing = str(uuid.UUID(int=uuid.UUID(sample_dataset.ids[10]).int + 1))
        assert refetch_row(hook, missing) is None
        assert refetch_row(hook, str(uuid.UUID(int=0))) is None
        assert refetch_row(hook, "ffffffff-ffff-ffff-ffff-ffffffffffff") is None
    finally:
        hook.close()


def test_refetch_replays_the_servers_version_or_the_payload(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch, ai_server: str, sample_dataset: EmbeddingDataset
) -> None:
    dim = sample_dataset.dimension
    conn.execute("DROP TABLE recruit_embedding, recruit_metadata")
    conn.commit()
    apply_schema(conn, dim)
    known = sample_dataset.ids[42]
    unknown = str(uuid.UUID(int=uuid.UUID(known).int + 1))
    broken = np.full(dim, np.nan, dtype="<f4").tobytes()
    _dead_letter(conn, _chunk([known, unknown], [broken, _vec(5, dim) + b"\0"]), dim)
    conn.execute(
        "UPDATE recruit_embedding_dlq SET payload = jsonb_set(payload, '{vector}', %s) WHERE id = %s",
        (json.dumps(np.frombuffer(_vec(5, dim), "<f4").astype(float).tolist()), unknown),
    )
    conn.commit()
    hook = embedding_hook(monkeypatch, ai_server, "embedding_grpc_replay", timeout=10)
    try:
        stats = replay_dlq(
            conn, ChunkWriter(conn, dimension=dim), dimension=dim, refetch=functools.partial(refetch_row, hook)
        )
    finally:
        hook.close()
    assert (stats.selected, stats.resolved, stats.refetched, stats.still_failing) == (2, 2, 1, 0)
    stored = stored_rows(conn)
    assert stored[known][1] == sample_dataset.vectors[42].astype("<f4").tobytes()
    assert stored[known][0][3] == sample_dataset.primary_keyword[42]
    assert stored[unknown] == (("EPAM", 2, "upper", "Python"), _vec(5, dim))


def test_refetched_rows_are_written_over_a_newer_stored_row_and_payloads_are_not(
    conn: psycopg.Connection,
    pg_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    ai_server: str,
    sample_dataset: EmbeddingDataset,
) -> None:
    dim = sample_dataset.dimension
    conn.execute("DROP TABLE recruit_embedding, recruit_metadata")
    conn.commit()
    apply_schema(conn, dim)
    known = sample_dataset.ids[42]
    unknown = str(uuid.UUID(int=uuid.UUID(known).int + 1))  # not on the AI server
    _forbid_cobol(conn)
    _ingest(pg_dsn, _chunk([known, unknown], [_vec(1, dim), _vec(2, dim)], keyword="COBOL"), dim)
    _ingest(pg_dsn, _chunk([known, unknown], [_vec(3, dim), _vec(4, dim)]), dim)  # stored after the entries
    _forbid_cobol(conn, False)
    hook = embedding_hook(monkeypatch, ai_server, "embedding_grpc_replay", timeout=10)
    try:
        stats = replay_dlq(
            conn, ChunkWriter(conn, dimension=dim), dimension=dim, refetch=functools.partial(refetch_row, hook)
        )
    finally:
        hook.close()
    assert (stats.selected, stats.refetched, stats.resolved, stats.superseded, stats.updated) == (2, 1, 1, 1, 1)
    stored = stored_rows(conn)
    # The server's current version replaces the stored one; the unknown id's stale payload does not.
    assert stored[known][1] == sample_dataset.vectors[42].astype("<f4").tobytes()
    assert stored[known][0][3] == sample_dataset.primary_keyword[42]
    assert stored[unknown] == (("EPAM", 2, "upper", "Python"), _vec(4, dim))
    assert [r[:2] for r in _dlq(conn)] == [(known, "resolved"), (unknown, "superseded")]
