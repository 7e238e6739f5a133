"""Write one batch: metadata, then embeddings, then DLQ rows, progress and checkpoint, in one
transaction.

One transaction a batch means a crash keeps either all of a batch (good rows, rejected rows and
the position that covers them) or none of it; re-running then re-sends the batch and the upserts
make that harmless (docs/design.md §2, 7.3, 8).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from airflow_embedding_provider.digest import row_hashes
from airflow_embedding_provider.rows import RowBatch
from airflow_embedding_provider.storage.checkpoint import (
    DEFAULT_STREAM,
    PartitionKey,
    advance_checkpoint,
    record_deleted,
    record_progress_and_advance,
)
from airflow_embedding_provider.storage.copy_binary import embedding_copy_view, metadata_copy_buffer
from airflow_embedding_provider.storage.dlq import dead_letter
from airflow_embedding_provider.storage.outbox import CacheRequest, request_invalidation
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, TableNames
from airflow_embedding_provider.storage.sync import RangeSync, Reconciled, reconcile_range
from airflow_embedding_provider.validation import Rejected, json_vector

_STAGE_META = sql.Identifier("_embedding_stage_metadata")
_STAGE_VEC = sql.Identifier("_embedding_stage_vector")


@dataclass(frozen=True)
class WriteResult:
    """What one chunk did. ``unchanged`` rows matched what was stored and were not rewritten;
    ``duplicates`` are earlier occurrences of an id in the chunk that a later one replaced."""

    inserted: int
    updated: int
    unchanged: int
    duplicates: int
    rejected: int
    refused: int = 0  # of ``rejected``: rows PostgreSQL refused although they passed validation
    refused_rows: tuple[Rejected, ...] = ()
    deleted: int = 0  # rows a range sync deleted (storage/sync.py)
    deletes_blocked: int = 0  # rows a range sync would have deleted but for its limit

    @property
    def stored(self) -> int:
        return self.inserted + self.updated + self.unchanged


def keep_last_occurrence(batch: RowBatch) -> tuple[RowBatch, int]:
    """The batch with each id once, its last occurrence winning (the latest row, docs/design.md §10.4), in id order; and
    how many went.

    One ``INSERT ... ON CONFLICT`` cannot touch the same row twice, so this also keeps a chunk
    that repeats an id from failing as a whole. Id order makes every writer lock rows in the same
    order, so two writers with overlapping ids (two uploads, two runs) wait instead of deadlocking.
    """
    ids = list(batch.ids)
    if ids == sorted(ids) and len(set(ids)) == len(ids):
        return batch, 0  # the usual case, told in C: unique ids that arrived in order
    last = {row_id: i for i, row_id in enumerate(batch.ids)}
    order = [last[row_id] for row_id in sorted(last)]
    if order == list(range(len(batch))):
        return batch, 0  # the usual case: unique ids that arrived in order
    return batch.take(order), len(batch) - len(last)


@dataclass(frozen=True)
class _Step:
    """What a write records besides its rows (see :meth:`ChunkWriter.write`)."""

    rejected: Sequence[Rejected]
    checkpoint: str | None
    origin: Mapping[str, Any]
    partition: PartitionKey | None
    done: bool
    dead_letter_refused: bool
    reconcile: RangeSync | None = None


class ChunkWriter:
    """Upserts chunks into the design's tables over one psycopg 3 connection.

    :param conn: a connection this writer alone uses, best in autocommit mode: each write is one
        explicit transaction (inside a caller's open transaction it becomes a savepoint).
    :param dimension: the configured vector dimension; the staging table is declared with it.
    :param tables: table names; the design's by default.
    :param stream_name: the checkpoint row this writer advances.
    :param cache_request: when given, every batch that inserts or changes rows records in the
        outbox, in the same transaction, that this cache target is stale.
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        *,
        dimension: int,
        tables: TableNames = DEFAULT_TABLES,
        stream_name: str = DEFAULT_STREAM,
        cache_request: CacheRequest | None = None,
    ) -> None:
        self._conn = conn
        self._cache_request = cache_request
        self._dimension = dimension
        self._tables = tables
        self._stream = stream_name
        self._ids = tables.identifiers()
        self._staged = False
        self._stage_dirty = True

    def cancel(self) -> None:
        """Ask PostgreSQL to cancel this writer's running statement, from any thread: an ingest that
        is stopped (a task's execution_timeout, a stream failure) must not wait for a write that is
        stuck on a lock."""
        if not self._conn.closed:
            self._conn.cancel_safe(timeout=5)

    def ensure_stage(self) -> None:
        """Create this connection's staging tables (once)."""
        if self._staged:
            return
        with self._conn.transaction():
            self._conn.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS {} (id uuid, company_name text, exp_years int4, "
                    "english_level text, primary_keyword text, row_hash int8) ON COMMIT DELETE ROWS"
                ).format(_STAGE_META)
            )
            self._conn.execute(
                sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (id uuid, vector vector({})) ON COMMIT DELETE ROWS").format(
                    _STAGE_VEC, sql.Literal(self._dimension)
                )
            )
        self._staged = True

    def write(
        self,
        batch: RowBatch,
        rejected: Sequence[Rejected] = (),
        *,
        checkpoint: str | None = None,
        origin: Mapping[str, Any] | None = None,
        partition: PartitionKey | None = None,
        done: bool = False,
        dead_letter_refused: bool = True,
        reconcile: RangeSync | None = None,
    ) -> WriteResult:
        """Store ``batch`` and ``rejected`` and advance the position to ``checkpoint``, atomically.

        Without ``partition`` the stream's checkpoint moves to ``checkpoint``. With it, the
        partition's committed position does (and ``done`` marks it finished), and the stream's
        checkpoint moves to the run's low watermark over all its partitions.

        Rows PostgreSQL refuses are isolated (see :meth:`_upsert_isolating`) and dead-lettered,
        unless ``dead_letter_refused`` is false: then they are only returned in ``refused_rows``
        (the DLQ replay updates the entries they came from instead of adding new ones).

        With ``reconcile`` the range's rows the source no longer has are deleted in the same
        transaction (storage/sync.py: :func:`reconcile_range`); pass it with ``done``.
        """
        if batch.dimension != self._dimension and len(batch):
            raise ValueError(f"batch dimension {batch.dimension} differs from the writer's {self._dimension}")
        self.ensure_stage()
        batch, duplicates = keep_last_occurrence(batch)
        step = _Step(rejected, checkpoint, origin or {}, partition, done, dead_letter_refused, reconcile)
        outermost = self._conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if outermost:
            # Optimistic: no savepoint. Should PostgreSQL refuse a row, the transaction rolls
            # back whole and runs again below, isolating the refused rows in savepoints.
            try:
                return self._write(batch, duplicates, step, isolate=False)
            except psycopg.Error as exc:
                if not _is_data_error(exc):
                    raise
        return self._write(batch, duplicates, step, isolate=True)

    def _write(self, batch: RowBatch, duplicates: int, step: _Step, *, isolate: bool) -> WriteResult:
        inserted = updated = 0
        reconciled = Reconciled(0, 0, 0, 0)
        refused: list[Rejected] = []
        rejected = step.rejected
        # As the outermost transaction, the stage starts empty (ON COMMIT DELETE ROWS emptied it).
        self._stage_dirty = self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
        with self._conn.transaction(), self._conn.cursor() as cur:
            if len(batch) and isolate:
                inserted, updated, refused = self._upsert_isolating(cur, batch)
                if step.dead_letter_refused:
                    rejected = [*rejected, *refused]
            elif len(batch):
                inserted, updated = self._store(cur, batch, direct=not self.has_stored_ids(cur, batch))
            if step.reconcile is not None:
                reconciled = reconcile_range(cur, self._tables, step.reconcile)
                if step.partition is not None and reconciled.deleted:
                    record_deleted(cur, self._tables, step.partition, reconciled.deleted)
            if (inserted or updated or reconciled.deleted) and self._cache_request is not None:
                request_invalidation(cur, self._tables, self._cache_request)
            if rejected:
                self._dead_letter(cur, rejected, step.origin)
            if step.partition is not None:
                record_progress_and_advance(cur, self._tables, step.partition, step.checkpoint, step.done)
            elif step.checkpoint is not None:
                advance_checkpoint(cur, self._tables, self._stream, step.checkpoint)
        return WriteResult(
            inserted=inserted,
            updated=updated,
            unchanged=len(batch) - len(refused) - inserted - updated,
            duplicates=duplicates,
            rejected=len(rejected),
            refused=len(refused),
            refused_rows=tuple(refused),
            deleted=reconciled.deleted,
            deletes_blocked=reconciled.blocked,
        )

    def _store(self, cur: psycopg.Cursor, batch: RowBatch, *, direct: bool) -> tuple[int, int]:
        """``(inserted, updated)``. ``direct``: none of the rows is stored (a first load, or the
        new rows after the checkpoint), so they are copied straight into the tables, about half
        the cost of staging and upserting them; else they are staged and upserted."""
        if direct:
            self.insert_new(cur, batch)
            return len(batch), 0
        return self._upsert(cur, batch)

    def _upsert_isolating(
        self, cur: psycopg.Cursor, batch: RowBatch, *, direct: bool | None = None
    ) -> tuple[int, int, list[Rejected]]:
        """Store the batch; when PostgreSQL refuses the data, halve it (each half in a savepoint)
        until the refused rows stand alone, as Kafka Connect's JDBC sink and Spring Batch's scan
        do: the others commit, the refused go to the DLQ with the database's message.

        Rows none of which is stored are copied straight in (see :meth:`_store`); should another
        writer store some of them meanwhile, the batch is upserted instead. Errors that are not
        about the data (connection lost, server shutting down, deadlock, timeout) propagate, so
        that the task retries instead of dead-lettering good rows.
        """
        if direct is None:
            direct = not self.has_stored_ids(cur, batch)
        try:
            with self._conn.transaction():
                inserted, updated = self._store(cur, batch, direct=direct)
                return inserted, updated, []
        except psycopg.Error as exc:
            if direct and isinstance(exc, psycopg.errors.UniqueViolation):
                # Another writer (a concurrent run) stored some of these ids since the check.
                return self._upsert_isolating(cur, batch, direct=False)
            if not _is_data_error(exc):
                raise
            if len(batch) == 1:
                return 0, 0, [_refused(batch, exc)]
            middle = len(batch) // 2
            a = self._upsert_isolating(cur, batch.slice(0, middle))
            b = self._upsert_isolating(cur, batch.slice(middle, len(batch)))
            return a[0] + b[0], a[1] + b[1], a[2] + b[2]

    def has_stored_ids(self, cur: psycopg.Cursor, batch: RowBatch) -> bool:
        """Whether any id between the batch's least and greatest is stored: one primary-key range
        probe. Embeddings reference metadata, so the metadata table answers for both."""
        row = cur.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE id BETWEEN %s AND %s)").format(self._ids["metadata"]),
            (min(batch.ids), max(batch.ids)),
        ).fetchone()
        return bool(row and row[0])

    def insert_new(self, cur: psycopg.Cursor, batch: RowBatch) -> None:
        """COPY BINARY rows that are not stored straight into both tables, metadata first (the
        embedding's foreign key needs it, docs/design.md §7.3). A stored id raises ``UniqueViolation``."""
        _copy_metadata(cur, self._ids["metadata"], batch)
        _copy_vectors(cur, self._ids["embedding"], batch)

    # The steps of an upsert, public so that bench/profile_engine.py times these very statements.

    def stage_metadata(self, cur: psycopg.Cursor, batch: RowBatch) -> None:
        """COPY BINARY the batch's metadata rows into the staging table."""
        _copy_metadata(cur, _STAGE_META, batch)

    def stage_vectors(self, cur: psycopg.Cursor, batch: RowBatch) -> None:
        """COPY BINARY the batch's embedding rows into the staging table, encoded by numpy."""
        _copy_vectors(cur, _STAGE_VEC, batch)

    def merge_metadata(self, cur: psycopg.Cursor) -> tuple[int, list[Any]]:
        """Upsert the staged metadata; returns how many rows are new and the ids of changed ones.
        Unchanged rows are skipped by the WHERE clause, so a re-run rewrites nothing."""
        row = cur.execute(
            sql.SQL(
                "WITH up AS (INSERT INTO {m} AS t (id, company_name, exp_years, english_level, primary_keyword, "
                "row_hash) SELECT id, company_name, exp_years, english_level, primary_keyword, row_hash FROM {s} "
                "ON CONFLICT (id) DO UPDATE SET company_name = EXCLUDED.company_name, exp_years = EXCLUDED.exp_years, "
                "english_level = EXCLUDED.english_level, primary_keyword = EXCLUDED.primary_keyword, "
                # row_hash covers the vector too: a changed vector rewrites the metadata row's hash,
                # but updated_at stays the time the metadata itself last changed.
                "row_hash = EXCLUDED.row_hash, updated_at = CASE WHEN "
                "(t.company_name, t.exp_years, t.english_level, t.primary_keyword) IS DISTINCT FROM "
                "(EXCLUDED.company_name, EXCLUDED.exp_years, EXCLUDED.english_level, EXCLUDED.primary_keyword) "
                "THEN now() ELSE t.updated_at END "
                "WHERE (t.company_name, t.exp_years, t.english_level, t.primary_keyword, t.row_hash) IS DISTINCT FROM "
                "(EXCLUDED.company_name, EXCLUDED.exp_years, EXCLUDED.english_level, EXCLUDED.primary_keyword, "
                "EXCLUDED.row_hash) "
                "RETURNING id, xmax = 0 AS inserted) "
                "SELECT count(*) FILTER (WHERE inserted), coalesce(array_agg(id) FILTER (WHERE NOT inserted), '{{}}') "
                "FROM up"
            ).format(m=self._ids["metadata"], s=_STAGE_META)
        ).fetchone()
        assert row is not None
        return int(row[0]), list(row[1])

    def merge_vectors(self, cur: psycopg.Cursor) -> list[Any]:
        """Upsert the staged embeddings; returns the ids of existing rows whose vector changed."""
        row = cur.execute(
            sql.SQL(
                "WITH up AS (INSERT INTO {e} AS t (id, vector) SELECT id, vector FROM {s} "
                "ON CONFLICT (id) DO UPDATE SET vector = EXCLUDED.vector, updated_at = now() "
                "WHERE t.vector IS DISTINCT FROM EXCLUDED.vector RETURNING id, xmax = 0 AS inserted) "
                "SELECT coalesce(array_agg(id) FILTER (WHERE NOT inserted), '{{}}') FROM up"
            ).format(e=self._ids["embedding"], s=_STAGE_VEC)
        ).fetchone()
        assert row is not None
        return list(row[0])

    def clear_stage(self, cur: psycopg.Cursor) -> None:
        cur.execute(sql.SQL("DELETE FROM {}").format(_STAGE_META))
        cur.execute(sql.SQL("DELETE FROM {}").format(_STAGE_VEC))

    def _upsert(self, cur: psycopg.Cursor, batch: RowBatch) -> tuple[int, int]:
        # ON COMMIT DELETE ROWS empties the stage when ours is the outermost transaction; inside
        # a caller's transaction, or after an earlier half of a bisected batch, empty it here.
        if self._stage_dirty:
            self.clear_stage(cur)
        self.stage_metadata(cur, batch)
        self.stage_vectors(cur, batch)
        self._stage_dirty = True
        # Metadata first: the embedding's foreign key needs it (docs/design.md §7.3).
        inserted, meta_changed = self.merge_metadata(cur)
        vector_changed = self.merge_vectors(cur)
        # New rows are new in both tables; an existing row is updated when either table changed.
        return inserted, len(set(meta_changed) | set(vector_changed))

    def _dead_letter(self, cur: psycopg.Cursor, rejected: Sequence[Rejected], origin: Mapping[str, Any]) -> None:
        dead_letter(cur, self._tables, rejected, origin)


def _copy_metadata(cur: psycopg.Cursor, table: sql.Composable, batch: RowBatch) -> None:
    """COPY BINARY the batch's metadata rows, each with its row hash (digest.py), into ``table``
    (the target or the stage)."""
    hashes = batch.hashes
    if hashes is None:  # not confirmed from the source's (validation.py): hash the rows here
        hashes = row_hashes(
            batch.ids, batch.company_name, batch.exp_years, batch.english_level, batch.primary_keyword, batch.vectors
        )
    with cur.copy(
        sql.SQL(
            "COPY {} (id, company_name, exp_years, english_level, primary_keyword, row_hash) FROM STDIN (FORMAT BINARY)"
        ).format(table)
    ) as copy:
        copy.write(metadata_copy_buffer(batch, hashes))


def _copy_vectors(cur: psycopg.Cursor, table: sql.Composable, batch: RowBatch) -> None:
    """COPY BINARY the batch's embedding rows into ``table`` (the target or the stage)."""
    with cur.copy(sql.SQL("COPY {} (id, vector) FROM STDIN (FORMAT BINARY)").format(table)) as copy:
        copy.write(embedding_copy_view(batch.ids, batch.vectors))  # the array itself, not a copy of it


#: SQLSTATE classes that are about the row itself: data exception, integrity constraint violation,
#: program limit exceeded (say, an index row too large). Anything else is not the row's fault.
_DATA_ERROR_CLASSES = ("22", "23", "54")


def _is_data_error(exc: psycopg.Error) -> bool:
    return bool(exc.sqlstate) and str(exc.sqlstate)[:2] in _DATA_ERROR_CLASSES


def _refused(batch: RowBatch, exc: psycopg.Error) -> Rejected:
    diag = exc.diag
    detail = f": {diag.message_detail}" if diag.message_detail else ""
    payload = batch.row(0) | {"vector": json_vector(batch.vectors[0])}
    return Rejected(
        id=batch.ids[0],
        kind="database_rejected",
        message=f"PostgreSQL refused the row (SQLSTATE {exc.sqlstate}): {diag.message_primary}{detail}",
        payload=payload,
        row_hash=int(
            row_hashes(
                batch.ids[:1],
                batch.company_name[:1],
                batch.exp_years[:1],
                batch.english_level[:1],
                batch.primary_keyword[:1],
                batch.vectors[:1],
            )[0]
        ),
    )
