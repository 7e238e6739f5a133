"""``statement_timeout`` and ``lock_timeout`` on the provider's sessions, against a lock held for real."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.storage.schema import apply_schema
from airflow_embedding_provider.storage.session import (
    SessionTimeouts,
    explain_timeout,
    timeouts_explained,
    without_statement_timeout,
)
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.upload_server.service import dsn_connector
from airflow_embedding_provider.validation import validate_chunk
from airflow_embedding_provider.wire.codec import decode_chunk


@pytest.fixture
def locked(pg_dsn: str) -> Iterator[None]:
    with psycopg.connect(pg_dsn, autocommit=True) as setup:
        apply_schema(setup, 384)
    with psycopg.connect(pg_dsn) as holder:
        holder.execute("LOCK TABLE recruit_metadata IN ACCESS EXCLUSIVE MODE")
        yield
        holder.rollback()


def test_a_write_behind_a_held_lock_fails_after_lock_timeout_with_what_to_do(
    pg_dsn: str, locked: None, sample_dataset: EmbeddingDataset
) -> None:
    batch, _ = validate_chunk(decode_chunk(sample_dataset.chunk(0, 10)), 384)
    with dsn_connector(pg_dsn, SessionTimeouts(lock_timeout=1))() as conn:
        began = time.monotonic()
        with pytest.raises(psycopg.errors.LockNotAvailable) as info:
            ChunkWriter(conn, dimension=384).write(batch)
        assert time.monotonic() - began < 10
    message = str(explain_timeout(info.value, SessionTimeouts(lock_timeout=1)))
    assert message.startswith("PostgreSQL gave up waiting for a lock after 1 s (RECRUIT_EMBEDDING_LOCK_TIMEOUT)")
    assert "pg_stat_activity" in message and "PostgreSQL said: canceling statement due to lock timeout" in message


def test_statement_timeout_is_explained_and_can_be_lifted(pg_dsn: str) -> None:
    with dsn_connector(pg_dsn, SessionTimeouts(statement_timeout=0.5))() as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("500ms",)
        with pytest.raises(Exception) as info, timeouts_explained(SessionTimeouts(statement_timeout=0.5)):
            conn.execute("SELECT pg_sleep(3)")
        assert type(info.value).__name__ == "DatabaseTimeoutError"
        assert str(info.value).startswith("a statement ran longer than 0.5 s (RECRUIT_EMBEDDING_STATEMENT_TIMEOUT)")
        with without_statement_timeout(conn):
            conn.execute("SELECT pg_sleep(1)")
        assert conn.execute("SHOW statement_timeout").fetchone() == ("500ms",)


@pytest.mark.parametrize(("raw", "message"), [("soon", "must be a number"), ("-1", "must not be negative")])
def test_bad_timeout_variables_are_refused_with_their_name(raw: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"RECRUIT_EMBEDDING_LOCK_TIMEOUT {message}"):
        SessionTimeouts.from_env({"RECRUIT_EMBEDDING_LOCK_TIMEOUT": raw})
    assert SessionTimeouts.from_env({}) == SessionTimeouts(300, 60)
