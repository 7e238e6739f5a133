"""A lock held for real makes ``recruit_embedding_ingest`` fail instead of hang: through
``lock_timeout`` with a message that says what to do, or, with that limit off, through the task's
``execution_timeout``, which also cancels the statement that waits."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from airflow_embedding_provider.storage.schema import apply_schema
from dev.stack import airflow

DAG_ID = "recruit_embedding_ingest"
#: ``airflow dags test`` is killed after this: today's code would wait on the lock for ever.
RUN_BOUND = 300


@pytest.fixture
def locked_metadata(pg_dsn: str) -> Iterator[psycopg.Connection]:
    """The tables exist and another session holds ACCESS EXCLUSIVE on ``recruit_metadata``."""
    with psycopg.connect(pg_dsn, autocommit=True) as setup:
        apply_schema(setup, 384)
    holder = psycopg.connect(pg_dsn)  # not autocommit: the lock lasts until the rollback below
    holder.execute("LOCK TABLE recruit_metadata IN ACCESS EXCLUSIVE MODE")
    yield holder
    holder.rollback()
    holder.close()


def run_dag(env: dict[str, str], **extra: str) -> tuple[int, str, float]:
    began = time.monotonic()
    result = airflow(["dags", "test", DAG_ID], {**env, **extra}, check=False, timeout=RUN_BOUND)
    return result.returncode, result.stdout + result.stderr, time.monotonic() - began


def waiting_sessions(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_held_lock_fails_the_task_with_a_clear_message(
    dag_env: dict[str, str], pg_dsn: str, locked_metadata: psycopg.Connection
) -> None:
    code, output, seconds = run_dag(dag_env, RECRUIT_EMBEDDING_LOCK_TIMEOUT="2")
    assert code != 0, output[-3000:]
    assert "PostgreSQL gave up waiting for a lock after 2 s (RECRUIT_EMBEDDING_LOCK_TIMEOUT)" in output, output[-5000:]
    assert "DatabaseTimeoutError" in output
    assert waiting_sessions(pg_dsn) == 0
    assert seconds < RUN_BOUND


def test_execution_timeout_stops_a_task_stuck_on_a_lock_and_cancels_its_statement(
    dag_env: dict[str, str], pg_dsn: str, locked_metadata: psycopg.Connection
) -> None:
    code, output, seconds = run_dag(
        dag_env,
        RECRUIT_EMBEDDING_LOCK_TIMEOUT="0",
        RECRUIT_EMBEDDING_STATEMENT_TIMEOUT="0",
        RECRUIT_EMBEDDING_TASK_TIMEOUT="20",
    )
    assert code != 0, output[-3000:]
    assert "AirflowTaskTimeout" in output, output[-5000:]
    # The writer's statement was cancelled, not left waiting on the lock behind the task.
    assert waiting_sessions(pg_dsn) == 0
    assert seconds < RUN_BOUND
