"""The checkpoint: where a stream resumes, the partitions of a mapped ingest run, their progress,
and the run's low watermark (docs/design.md §8).

A plan is stored once per run, so a retried planning task hands out the same ranges. Each chunk
transaction advances its partition's ``committed_uuid`` and, from all partitions of the run, the
low watermark: the highest id below which every row of the run is stored. Only that watermark
becomes the stream's checkpoint, so a resume never skips a row another partition has not written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from airflow_embedding_provider.partitions import Partition
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, TableNames

#: The checkpoint row the scheduled pull advances (``stream_name``).
DEFAULT_STREAM = "recruit"
#: Plans of runs (finished or failed) untouched for this long are deleted when a new run is planned.
KEEP_DAYS = 14


@dataclass(frozen=True)
class PartitionKey:
    stream_name: str
    run_id: str
    index: int


def _ids(tables: TableNames) -> dict[str, sql.Composable]:
    return tables.identifiers()


def save_plan(
    conn: psycopg.Connection, tables: TableNames, stream_name: str, run_id: str, partitions: Sequence[Partition]
) -> list[Partition]:
    """Store ``partitions`` for the run, or return the plan already stored for it (a retry)."""
    t = _ids(tables)["progress"]
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"plan:{stream_name}:{run_id}",))
        existing = load_plan(conn, tables, stream_name, run_id)
        if existing:
            return existing
        # Runs untouched for KEEP_DAYS, finished or not: a failed run cleared after that plans
        # again from the stream's checkpoint, which its committed rows already moved past.
        conn.execute(
            sql.SQL(
                "DELETE FROM {} WHERE stream_name = %s AND run_id IN (SELECT run_id FROM {} WHERE stream_name = %s "
                "GROUP BY run_id HAVING max(updated_at) < now() - make_interval(days => %s))"
            ).format(t, t),
            (stream_name, stream_name, KEEP_DAYS),
        )
        with conn.cursor() as cur:
            cur.executemany(
                sql.SQL(
                    "INSERT INTO {} (stream_name, run_id, partition_index, after_uuid, until_uuid, rows_planned, "
                    "sync_mode, max_deletes) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(t),
                [
                    (stream_name, run_id, p.index, p.after_uuid, p.until_uuid, p.rows, p.sync, p.max_deletes)
                    for p in partitions
                ],
            )
    return list(partitions)


def load_plan(conn: psycopg.Connection, tables: TableNames, stream_name: str, run_id: str) -> list[Partition]:
    rows = conn.execute(
        sql.SQL(
            "SELECT partition_index, after_uuid::text, until_uuid::text, rows_planned, sync_mode, max_deletes FROM {} "
            "WHERE stream_name = %s AND run_id = %s ORDER BY partition_index"
        ).format(_ids(tables)["progress"]),
        (stream_name, run_id),
    ).fetchall()
    return [
        Partition(index=r[0], after_uuid=r[1], until_uuid=r[2], rows=r[3], sync=r[4], max_deletes=int(r[5]))
        for r in rows
    ]


def committed_position(conn: psycopg.Connection, tables: TableNames, key: PartitionKey) -> tuple[str | None, bool]:
    """``(committed_uuid, done)`` of a partition; ``(None, False)`` when it has no progress yet."""
    with conn.transaction():
        row = conn.execute(
            sql.SQL(
                "SELECT committed_uuid::text, done FROM {} WHERE stream_name = %s AND run_id = %s "
                "AND partition_index = %s"
            ).format(_ids(tables)["progress"]),
            (key.stream_name, key.run_id, key.index),
        ).fetchone()
    return (None, False) if row is None else (row[0], bool(row[1]))


def resume_point(
    conn: psycopg.Connection, tables: TableNames, key: PartitionKey, partition: Partition
) -> tuple[str | None, str | None, bool]:
    """Where a (retried) task continues its partition: ``(after, committed, done)``.

    ``after`` is the later of the range's start and what an earlier try committed.
    """
    committed, done = committed_position(conn, tables, key)
    after = max(filter(None, (partition.after_uuid, committed)), default=None)
    return after, committed, done


# The low watermark over the partitions ``p(i, until_uuid, committed_uuid, done)`` of one run: all
# done, the last bound (the last partition of a range sync is open-ended: then what it committed,
# which its final transaction sets to the source's last id of the range); else the first unfinished partition's committed position, or, before it
# has any, the bound of the partition before it.
_WATERMARK = (
    "open AS (SELECT min(i) AS i FROM p WHERE NOT done), "
    "wm AS (SELECT CASE WHEN (SELECT i FROM open) IS NULL THEN "
    "(SELECT coalesce(until_uuid, committed_uuid) FROM p ORDER BY i DESC LIMIT 1) "
    "ELSE coalesce((SELECT committed_uuid FROM p WHERE i = (SELECT i FROM open)), "
    "(SELECT until_uuid FROM p WHERE i < (SELECT i FROM open) ORDER BY i DESC LIMIT 1)) END AS w)"
)


# Moves the stream's checkpoint up to ``w`` of the CTE ``wm``. The row is written, and so locked,
# only when ``w`` passes it, so that writers that do not move it do not queue on its lock;
# ``GREATEST`` keeps it from ever moving back, even with two runs at once.
_ADVANCE_TO_W = (
    " INSERT INTO {checkpoint} AS c (stream_name, last_processed_uuid, updated_at) "
    "SELECT %(stream)s, w, now() FROM wm WHERE w IS NOT NULL AND NOT EXISTS "
    "  (SELECT 1 FROM {checkpoint} WHERE stream_name = %(stream)s AND last_processed_uuid >= w) "
    "ON CONFLICT (stream_name) DO UPDATE SET last_processed_uuid = "
    "GREATEST(c.last_processed_uuid, EXCLUDED.last_processed_uuid), updated_at = now()"
)


def advance_checkpoint(cur: psycopg.Cursor, tables: TableNames, stream_name: str, last_processed_uuid: str) -> None:
    """Move the stream's checkpoint forward to ``last_processed_uuid``; never back."""
    cur.execute(
        sql.SQL("WITH wm AS (SELECT %(position)s::uuid AS w)" + _ADVANCE_TO_W).format(
            checkpoint=_ids(tables)["checkpoint"]
        ),
        {"position": last_processed_uuid, "stream": stream_name},
    )


def low_watermark(cur: psycopg.Cursor, tables: TableNames, stream_name: str, run_id: str) -> str | None:
    """The run's low watermark: every row of the run with an id up to it is stored."""
    row = cur.execute(
        sql.SQL(
            "WITH p AS (SELECT partition_index AS i, until_uuid, committed_uuid, done FROM {} "
            "  WHERE stream_name = %s AND run_id = %s), " + _WATERMARK + " SELECT w::text FROM wm"
        ).format(_ids(tables)["progress"]),
        (stream_name, run_id),
    ).fetchone()
    return None if row is None else row[0]


def record_progress_and_advance(
    cur: psycopg.Cursor, tables: TableNames, key: PartitionKey, committed_uuid: str | None, done: bool
) -> None:
    """Advance a partition's committed position (never backwards) and its done flag, then move the
    stream's checkpoint up to the run's new low watermark (as :func:`advance_checkpoint`), in one
    statement: every sub-batch of every partition runs it, one round trip instead of three."""
    ids = _ids(tables)
    cur.execute(
        sql.SQL(
            "WITH mine AS (UPDATE {progress} SET committed_uuid = GREATEST(committed_uuid, %(committed)s::uuid), "
            "  done = done OR %(done)s, updated_at = now() "
            "  WHERE stream_name = %(stream)s AND run_id = %(run)s AND partition_index = %(index)s "
            "  RETURNING partition_index AS i, until_uuid, committed_uuid, done), "
            # A statement does not see its own CTE's update: this partition comes from RETURNING.
            "p AS (SELECT * FROM mine UNION ALL SELECT partition_index, until_uuid, committed_uuid, done "
            "  FROM {progress} WHERE stream_name = %(stream)s AND run_id = %(run)s AND partition_index <> %(index)s), "
            + _WATERMARK
            + _ADVANCE_TO_W
        ).format(progress=ids["progress"], checkpoint=ids["checkpoint"]),
        {"committed": committed_uuid, "done": done, "stream": key.stream_name, "run": key.run_id, "index": key.index},
    )


def record_deleted(cur: psycopg.Cursor, tables: TableNames, key: PartitionKey, deleted: int) -> None:
    """Count rows a partition's sync deleted; call it in the transaction that deleted them."""
    cur.execute(
        sql.SQL(
            "UPDATE {} SET deleted = deleted + %s WHERE stream_name = %s AND run_id = %s AND partition_index = %s"
        ).format(_ids(tables)["progress"]),
        (deleted, key.stream_name, key.run_id, key.index),
    )


def deleted_in_run(cur: psycopg.Cursor, tables: TableNames, stream_name: str, run_id: str) -> int | None:
    """Rows the run's partitions deleted, whichever try did it; ``None`` when the run has no plan."""
    row = cur.execute(
        sql.SQL("SELECT sum(deleted) FROM {} WHERE stream_name = %s AND run_id = %s").format(_ids(tables)["progress"]),
        (stream_name, run_id),
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def read_checkpoint(
    conn: psycopg.Connection, tables: TableNames = DEFAULT_TABLES, stream_name: str = DEFAULT_STREAM
) -> str | None:
    """The stream's checkpoint: the id after which it resumes (``None``: from the start)."""
    with conn.transaction():
        row = conn.execute(
            sql.SQL("SELECT last_processed_uuid FROM {} WHERE stream_name = %s").format(
                tables.identifiers()["checkpoint"]
            ),
            (stream_name,),
        ).fetchone()
    return None if row is None or row[0] is None else str(row[0])
