"""``EmbeddingPostgresHook`` over a real PostgreSQL: the connections the storage layer needs, through
an Airflow connection."""

from __future__ import annotations

import psycopg
import pytest

from airflow_embedding_provider.hooks.postgres import EmbeddingPostgresHook, psycopg3_connection
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, TableNames
from airflow_embedding_provider.storage.session import DatabaseTimeoutError, SessionTimeouts


@pytest.fixture
def conn_id(monkeypatch: pytest.MonkeyPatch, pg_dsn: str) -> str:
    monkeypatch.setenv("AIRFLOW_CONN_EMBEDDINGS_DB", pg_dsn)
    return "embeddings_db"


def _settings(conn: psycopg.Connection) -> tuple[str | None, str | None]:
    row = conn.execute("SELECT current_setting('statement_timeout'), current_setting('lock_timeout')").fetchone()
    assert row is not None
    return row[0], row[1]


def test_a_connection_is_psycopg3_autocommit_with_the_session_timeouts(conn_id: str) -> None:
    hook = EmbeddingPostgresHook(
        postgres_conn_id=conn_id, timeouts=SessionTimeouts(statement_timeout=7, lock_timeout=2)
    )
    assert hook.get_conn_id() == conn_id and hook.tables == DEFAULT_TABLES
    with hook.get_psycopg3_conn() as conn:
        assert isinstance(conn, psycopg.Connection) and conn.autocommit
        assert _settings(conn) == ("7s", "2s")
    with psycopg3_connection(conn_id, SessionTimeouts(statement_timeout=3, lock_timeout=1)) as conn:
        assert _settings(conn) == ("3s", "1s")


def test_the_hook_names_the_tables_it_was_given(conn_id: str) -> None:
    tables = TableNames(metadata="m", embedding="e", dlq="d")
    assert EmbeddingPostgresHook(postgres_conn_id=conn_id, tables=tables).tables is tables


def test_connections_are_closed_afterwards_and_a_timeout_says_what_to_do(conn_id: str) -> None:
    hook = EmbeddingPostgresHook(postgres_conn_id=conn_id, timeouts=SessionTimeouts(statement_timeout=0.2))
    with hook.connections(2) as conns:
        assert len(conns) == 2 and len({c.info.backend_pid for c in conns}) == 2
    assert all(c.closed for c in conns)
    with pytest.raises(DatabaseTimeoutError), hook.connections(1) as (conn,):
        conn.execute("SELECT pg_sleep(5)")
    assert conn.closed
