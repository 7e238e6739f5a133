"""The cache invalidation outbox: record that a target's cache must be dropped, in the same
transaction as the data change that makes it stale (docs/design.md §7.4, 10.1-10.2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, TableNames

#: The API server's cache that the design's tables feed (docs/design.md §7.4): what the ingest,
#: the DLQ replay and uploads mark stale, and what ``CacheInvalidateOperator`` drops by default.
DEFAULT_CACHE_TARGET = "recruit"


@dataclass(frozen=True)
class CacheRequest:
    """Which cache a writer's changes make stale, and who asks (one pending entry per source).

    :param target: the API server's cache target, e.g. ``recruit``.
    :param source: who changed data, e.g. ``dag_id/run_id/map_index``; distinct writers use
        distinct sources so that they never wait on each other's outbox row.
    """

    target: str
    source: str


def request_invalidation(cur: psycopg.Cursor, tables: TableNames, request: CacheRequest) -> None:
    """Add a pending entry, or bump the version of this source's pending one.

    The bump matters when a deliverer has read the entry and is calling right now: a change that
    commits during its call may reach the API server after the cache was dropped, so the
    deliverer must leave the entry pending (it marks only the versions it read).
    """
    cur.execute(
        sql.SQL(
            "INSERT INTO {t} AS t (target, source) VALUES (%s, %s) "
            "ON CONFLICT (target, source) WHERE delivered_at IS NULL "
            "DO UPDATE SET version = t.version + 1, requested_at = now()"
        ).format(t=tables.identifiers()["outbox"]),
        (request.target, request.source),
    )


#: First key of the outbox's advisory locks (two-int form, so never the schema lock's bigint key).
OUTBOX_LOCK_CLASS = 0x6F627831  # "obx1"


class DeliveryBusyError(RuntimeError):
    """Another deliverer held the target's lock for longer than the bounded wait."""


@dataclass(frozen=True)
class Delivery:
    """What one :func:`deliver` did.

    :param outcome: ``delivered`` (one call, ``entry_ids`` marked delivered), ``nothing_pending``
        (no call) or ``busy`` (no call: another deliverer kept the lock past the bounded wait).
    """

    target: str
    outcome: str
    entry_ids: tuple[int, ...] = ()


def _outbox_exists(conn: psycopg.Connection, tables: TableNames) -> bool:
    row = conn.execute("SELECT to_regclass(%s)", (tables.identifiers()["outbox"].as_string(conn),)).fetchone()
    return row is not None and row[0] is not None


def pending_targets(conn: psycopg.Connection, tables: TableNames = DEFAULT_TABLES) -> list[str]:
    """Targets with at least one pending entry, oldest request first; none when there is no outbox."""
    with conn.transaction():
        if not _outbox_exists(conn, tables):
            return []
        rows = conn.execute(
            sql.SQL(
                "SELECT target FROM {} WHERE delivered_at IS NULL GROUP BY target ORDER BY min(requested_at), target"
            ).format(tables.identifiers()["outbox"])
        ).fetchall()
    return [row[0] for row in rows]


def pending_entries(conn: psycopg.Connection, target: str, tables: TableNames = DEFAULT_TABLES) -> list[int]:
    """Ids of the target's pending entries, oldest first."""
    with conn.transaction():
        if not _outbox_exists(conn, tables):
            return []
        return _pending_ids(conn, target, tables)


def _pending_ids(conn: psycopg.Connection, target: str, tables: TableNames) -> list[int]:
    return [entry_id for entry_id, _ in _pending_versions(conn, target, tables)]


def _pending_versions(conn: psycopg.Connection, target: str, tables: TableNames) -> list[tuple[int, int]]:
    rows = conn.execute(
        sql.SQL("SELECT id, version FROM {} WHERE target = %s AND delivered_at IS NULL ORDER BY id").format(
            tables.identifiers()["outbox"]
        ),
        (target,),
    ).fetchall()
    return [(int(row[0]), int(row[1])) for row in rows]


def lock_target(conn: psycopg.Connection, target: str, tables: TableNames = DEFAULT_TABLES) -> None:
    """Take the target's delivery lock until the end of the current transaction (waits for it)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (OUTBOX_LOCK_CLASS, f"{tables.outbox}:{target}"))


def deliver(
    conn: psycopg.Connection,
    target: str,
    call: Callable[[str], None],
    *,
    lock_wait: float,
    tables: TableNames = DEFAULT_TABLES,
) -> Delivery:
    """Deliver the target's pending entries with one ``call(target)``, single-flight across processes.

    Under the target's advisory lock: read the pending entries; none, no call; else call, then mark
    exactly those entries, at the versions read, delivered. A request that arrives during the call
    (a new entry, or a change that bumps a read entry's version) stays pending and causes exactly
    one more call later (a waiting deliverer or the retry DAG).
    Deliverers that queued behind the lock find their entries delivered and make no call: that
    is the coalescing (docs/design.md §10.1).

    When ``call`` raises, the entries stay pending with ``attempts`` + 1 and ``last_error``, and the
    error is re-raised for the caller's retry policy.

    The lock is a transaction lock, released by the same commit that marks the entries delivered,
    so a waiter can never see the lock free and the entries still pending. It is held for the call
    (bounded by the call's own deadline) and waited for at most ``lock_wait`` seconds.

    :param conn: a connection with no transaction open (the lock must end with this function).
    :param call: makes the call; must have a deadline and raise on failure.
    :param lock_wait: seconds to wait for another deliverer; then ``busy``. Set it above the call's
        deadline so that a waiter outlasts one call in flight.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        raise ValueError("deliver() needs a connection with no transaction open: the lock ends with its commit")
    outbox = tables.identifiers()["outbox"]
    failure: Exception | None = None
    try:
        with conn.transaction():
            if not _outbox_exists(conn, tables):
                return Delivery(target, "nothing_pending")
            conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{max(1, round(lock_wait * 1000))}ms",))
            lock_target(conn, target, tables)
            versions = _pending_versions(conn, target, tables)
            ids = [entry_id for entry_id, _ in versions]
            if not ids:
                return Delivery(target, "nothing_pending")
            try:
                call(target)
            except Exception as exc:
                failure = exc
                conn.execute(
                    sql.SQL("UPDATE {} SET attempts = attempts + 1, last_error = %s WHERE id = ANY(%s)").format(outbox),
                    (str(exc)[:2000], ids),
                )
            else:
                # Only the versions read: an entry re-requested during the call stays pending.
                conn.execute(
                    sql.SQL(
                        "UPDATE {} AS t SET delivered_at = NOW(), attempts = attempts + 1, last_error = NULL "
                        "FROM unnest(%s::bigint[], %s::bigint[]) AS d(id, version) "
                        "WHERE t.id = d.id AND t.version = d.version"
                    ).format(outbox),
                    (ids, [version for _, version in versions]),
                )
    except psycopg.errors.LockNotAvailable:
        return Delivery(target, "busy")
    if failure is not None:
        raise failure
    return Delivery(target, "delivered", tuple(ids))
