"""The cache invalidation outbox: record that a target's cache must be dropped, in the same
transaction as the data change that makes it stale (SEED.md 7.4, 10.1-10.2)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from airflow_embedding_provider.storage.schema import TableNames


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
    """Add a pending entry unless this source already has one for the target."""
    cur.execute(
        sql.SQL(
            "INSERT INTO {} (target, source) VALUES (%s, %s) "
            "ON CONFLICT (target, source) WHERE delivered_at IS NULL DO NOTHING"
        ).format(tables.identifiers()["outbox"]),
        (request.target, request.source),
    )
