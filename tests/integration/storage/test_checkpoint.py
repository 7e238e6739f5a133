"""Stored plans: a retried planning task gets the same ranges; stale plans are pruned."""

from __future__ import annotations

import psycopg
import pytest

from airflow_embedding_provider.partitions import Partition
from airflow_embedding_provider.storage.checkpoint import KEEP_DAYS, load_plan, save_plan
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, apply_schema

STREAM = "recruit"


@pytest.fixture
def conn(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as c:
        apply_schema(c, 8)
        yield c


def _plan(n: int) -> list[Partition]:
    return [Partition(index=i, after_uuid=None, until_uuid=None, rows=10) for i in range(n)]


def _runs(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT DISTINCT run_id FROM embedding_partition_progress").fetchall()}


def test_a_run_planned_again_gets_its_first_plan(conn: psycopg.Connection) -> None:
    first = save_plan(conn, DEFAULT_TABLES, STREAM, "run-1", _plan(3))
    again = save_plan(conn, DEFAULT_TABLES, STREAM, "run-1", _plan(5))
    assert again == first == load_plan(conn, DEFAULT_TABLES, STREAM, "run-1")


def test_plans_untouched_for_keep_days_are_pruned_finished_or_not(conn: psycopg.Connection) -> None:
    for run in ("old-done", "old-failed", "recent-failed"):
        save_plan(conn, DEFAULT_TABLES, STREAM, run, _plan(2))
    conn.execute("UPDATE embedding_partition_progress SET done = true WHERE run_id = 'old-done'")
    conn.execute(
        "UPDATE embedding_partition_progress SET updated_at = now() - make_interval(days => %s) "
        "WHERE run_id LIKE 'old-%%'",
        (KEEP_DAYS + 1,),
    )
    # One partition of a long failed run moved recently: the run is not stale.
    conn.execute(
        "UPDATE embedding_partition_progress SET updated_at = now() - make_interval(days => %s) "
        "WHERE run_id = 'recent-failed' AND partition_index = 0",
        (KEEP_DAYS + 1,),
    )
    save_plan(conn, DEFAULT_TABLES, STREAM, "new", _plan(1))
    assert _runs(conn) == {"recent-failed", "new"}
