"""The stored side of range sync against a real PostgreSQL: digests, DLQ accounting, deletions."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import numpy as np
import psycopg

from airflow_embedding_provider.digest import RangeDigest, row_hashes
from airflow_embedding_provider.rows import RowBatch
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, apply_schema
from airflow_embedding_provider.storage.sync import (
    RangeSync,
    counts_rows,
    differing_keys,
    stored_digests,
    stored_listing,
)
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.validation import validate_chunk
from airflow_embedding_provider.wire.codec import WireChunk

DIM = 8


def _batch(n: int, start: int = 0, keyword: str = "Python") -> RowBatch:
    ids = [str(uuid.UUID(int=(0x019B << 112) | (i + start))) for i in range(n)]
    vectors = np.random.default_rng(start).standard_normal((n, DIM)).astype(np.float32)
    return RowBatch(ids, ["Żabka"] * n, [3] * n, [None] * n, [keyword] * n, vectors)


def _hashes(batch: RowBatch) -> np.ndarray:
    return row_hashes(
        batch.ids, batch.company_name, batch.exp_years, batch.english_level, batch.primary_keyword, batch.vectors
    )


def _keys(ids: Sequence[str]) -> bytes:
    return b"".join(uuid.UUID(i).bytes for i in ids)


def _conn(dsn: str) -> psycopg.Connection:
    conn = psycopg.connect(dsn, autocommit=True)
    apply_schema(conn, DIM)
    return conn


def test_stored_digests_equal_the_source_digests_of_the_same_rows(pg_dsn: str) -> None:
    batch = _batch(400)
    with _conn(pg_dsn) as conn:
        writer = ChunkWriter(conn, dimension=DIM)
        writer.write(batch.slice(0, 200))  # COPY straight in
        writer.write(batch.slice(150, 400))  # staged and upserted
        cut = batch.ids[99]
        stored = stored_digests(conn, DEFAULT_TABLES, [(None, cut), (cut, None), (None, None)])
        hashes = _hashes(batch)
        assert [s.digest for s in stored] == [
            RangeDigest.of(hashes[:100]),
            RangeDigest.of(hashes[100:]),
            RangeDigest.of(hashes),
        ]
        assert all(s.unhashed == 0 for s in stored)
        # A changed row changes its range's digest, and only that one.
        writer.write(_batch(1, start=250, keyword="Rust"))
        after = stored_digests(conn, DEFAULT_TABLES, [(None, cut), (cut, None)])
        assert after[0] == stored[0] and after[1] != stored[1]


def test_a_pending_dlq_entry_counts_as_the_row_the_source_sent(pg_dsn: str) -> None:
    good = _batch(10)
    bad_vector = np.full(DIM + 1, 0.5, dtype="<f4").tobytes()  # another dimension: dead-lettered
    bad_id = str(uuid.UUID(int=(0x019B << 112) | 50))
    chunk = WireChunk(
        [*good.ids, bad_id],
        [*good.company_name, "Bad"],
        [*good.exp_years, 1],
        [*good.english_level, None],
        [*good.primary_keyword, "Go"],
        [*(v.astype("<f4").tobytes() for v in good.vectors), bad_vector],
    )
    batch, rejected = validate_chunk(chunk, DIM)
    assert len(rejected) == 1
    with _conn(pg_dsn) as conn:
        ChunkWriter(conn, dimension=DIM).write(batch, rejected)
        listing = stored_listing(conn, DEFAULT_TABLES, (None, None))
        assert listing[uuid.UUID(bad_id).bytes] == rejected[0].row_hash
        source = np.array([*_hashes(good).tolist(), rejected[0].row_hash], dtype=np.int64)
        assert stored_digests(conn, DEFAULT_TABLES, [(None, None)])[0].digest == RangeDigest.of(source)


def test_reconcile_deletes_only_rows_the_source_did_not_list_and_settles_their_dlq_entries(pg_dsn: str) -> None:
    batch = _batch(100)
    with _conn(pg_dsn) as conn:
        writer = ChunkWriter(conn, dimension=DIM)
        writer.write(batch)
        gone = set(batch.ids[::10])
        conn.execute(
            "INSERT INTO recruit_embedding_dlq (id, error_kind, row_key, row_hash) VALUES (%s, 'x', 'k1', 1), "
            "(%s, 'x', 'k2', 2)",
            (batch.ids[0], batch.ids[1]),
        )
        kept = [i for i in batch.ids if i not in gone]
        hashes = _hashes(batch)[[k for k, i in enumerate(batch.ids) if i not in gone]]
        evidence = RangeSync(None, None, _keys(kept), hashes, max_deletes=9)
        held = writer.write(RowBatch.empty(DIM), reconcile=evidence)
        assert (held.deleted, held.deletes_blocked) == (0, 10)  # over the limit: nothing goes
        assert conn.execute("SELECT count(*) FROM recruit_metadata").fetchone() == (100,)

        done = writer.write(RowBatch.empty(DIM), reconcile=RangeSync(None, None, _keys(kept), hashes, 10))
        assert (done.deleted, done.deletes_blocked) == (10, 0)
        assert {r[0] for r in conn.execute("SELECT id::text FROM recruit_metadata")} == set(kept)
        assert conn.execute("SELECT count(*) FROM recruit_embedding").fetchone() == (90,)  # by cascade
        statuses: dict[str, str] = dict(conn.execute("SELECT row_key, status FROM recruit_embedding_dlq").fetchall())
        # ids[0] is gone upstream: withdrawn; ids[1]'s source row is another version: superseded.
        assert statuses == {"k1": "withdrawn", "k2": "superseded"}

        again = writer.write(RowBatch.empty(DIM), reconcile=RangeSync(None, None, _keys(kept), hashes, 10))
        assert (again.deleted, again.deletes_blocked) == (0, 0)  # a second run changes nothing


def test_differing_keys_are_the_listed_rows_not_stored_as_the_source_has_them(pg_dsn: str) -> None:
    batch = _batch(300)
    hashes = _hashes(batch)
    keys = _keys(batch.ids)
    cut = batch.ids[199]
    with _conn(pg_dsn) as conn:
        # Nothing stored (a first load): every listed row differs, in the listing's order.
        assert not counts_rows(conn, DEFAULT_TABLES, (None, None))
        assert differing_keys(conn, DEFAULT_TABLES, (None, None), keys, hashes) == keys
        # A listing out of order is answered in PostgreSQL's order, as when rows are stored.
        backwards = _keys(batch.ids[::-1])
        assert differing_keys(conn, DEFAULT_TABLES, (None, None), backwards, hashes[::-1]) == keys

        ChunkWriter(conn, dimension=DIM).write(batch.slice(0, 200))
        assert counts_rows(conn, DEFAULT_TABLES, (None, cut)) and not counts_rows(conn, DEFAULT_TABLES, (cut, None))
        changed = hashes.copy()
        changed[[5, 50]] += 1  # two stored rows the source now has otherwise
        expected = _keys([batch.ids[5], batch.ids[50], *batch.ids[200:]])
        assert differing_keys(conn, DEFAULT_TABLES, (None, None), keys, changed) == expected
        assert differing_keys(conn, DEFAULT_TABLES, (None, cut), keys[: 16 * 200], changed[:200]) == expected[:32]
        assert differing_keys(conn, DEFAULT_TABLES, (None, cut), keys[: 16 * 200], hashes[:200]) == b""

        # A pending DLQ entry counts as stored, with its hash: the range is no longer empty.
        conn.execute(
            "INSERT INTO recruit_embedding_dlq (id, error_kind, row_key, row_hash) VALUES (%s, 'x', 'k', %s)",
            (batch.ids[250], int(hashes[250])),
        )
        assert counts_rows(conn, DEFAULT_TABLES, (cut, None))
        rest = _keys([i for k, i in enumerate(batch.ids[200:], 200) if k != 250])
        assert differing_keys(conn, DEFAULT_TABLES, (cut, None), keys[16 * 200 :], hashes[200:]) == rest
