"""Outbox delivery against a real PostgreSQL and the real reference API server."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from airflow_embedding_provider.hooks.grpc_cache import CacheInvalidationError, GrpcCacheHook
from airflow_embedding_provider.storage.outbox import (
    CacheRequest,
    Delivery,
    deliver,
    lock_target,
    pending_entries,
    pending_targets,
    request_invalidation,
)
from airflow_embedding_provider.storage.schema import TableNames, apply_schema
from dev.api_server.service import read_stats
from dev.stack import ServerProcess

TABLES = TableNames()


@pytest.fixture
def dsn(pg_dsn: str) -> str:
    with psycopg.connect(pg_dsn) as conn:
        apply_schema(conn, 8)
    return pg_dsn


def _request(dsn: str, source: str, target: str = "recruit") -> None:
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        request_invalidation(cur, TABLES, CacheRequest(target, source))


def _server(tmp_path: Path, *options: str) -> tuple[ServerProcess, Path]:
    stats = tmp_path / "stats.json"
    return ServerProcess(["api-server", "--stats-file", str(stats), *options]), stats


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], GrpcCacheHook]]:
    """Makes a hook on ``cache_grpc_default`` pointing at a server's ``host:port``."""
    holder: list[GrpcCacheHook] = []

    def make(target: str) -> GrpcCacheHook:
        host, port = target.rsplit(":", 1)
        monkeypatch.setenv(
            "AIRFLOW_CONN_CACHE_GRPC_DEFAULT",
            json.dumps({"conn_type": "embedding_grpc", "host": host, "port": int(port), "extra": {"timeout": 5}}),
        )
        holder.append(GrpcCacheHook())
        return holder[-1]

    yield make
    for h in holder:
        h.close()


def test_no_outbox_table_means_nothing_pending(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        assert pending_targets(conn) == [] and pending_entries(conn, "recruit") == []
        assert deliver(conn, "recruit", lambda _: pytest.fail("no call expected"), lock_wait=1).outcome == (
            "nothing_pending"
        )


def test_delivery_marks_exactly_what_it_read(dsn: str, tmp_path: Path, hook) -> None:
    _request(dsn, "run-1")
    _request(dsn, "run-1")  # the same source twice is one pending entry
    _request(dsn, "run-2", target="company")
    server, stats = _server(tmp_path)
    with server, psycopg.connect(dsn) as conn:
        assert pending_targets(conn) == ["recruit", "company"]
        cache = hook(server.target)

        def call_while_another_run_writes(target: str) -> None:
            _request(dsn, "run-3")  # arrives while the call is in flight
            cache.invalidate(target)

        first = deliver(conn, "recruit", call_while_another_run_writes, lock_wait=10)
        assert first.outcome == "delivered" and len(first.entry_ids) == 1
        # The request that arrived during the call stays pending: exactly one more call.
        assert len(pending_entries(conn, "recruit")) == 1
        assert deliver(conn, "recruit", cache.invalidate, lock_wait=10).outcome == "delivered"
        assert deliver(conn, "recruit", cache.invalidate, lock_wait=10) == Delivery("recruit", "nothing_pending")
        assert pending_targets(conn) == ["company"]
        assert read_stats(stats).invalidations == {"recruit": 2}


def test_a_change_by_the_same_source_during_the_call_keeps_its_entry_pending(dsn: str, tmp_path: Path, hook) -> None:
    _request(dsn, "run-1/0")
    server, stats = _server(tmp_path)
    with server, psycopg.connect(dsn) as conn:
        cache = hook(server.target)

        def call_while_the_same_writer_commits_again(target: str) -> None:
            cache.invalidate(target)
            _request(dsn, "run-1/0")  # its change may reach the API server after the cache was dropped

        first = deliver(conn, "recruit", call_while_the_same_writer_commits_again, lock_wait=10)
        assert first.outcome == "delivered"
        assert len(pending_entries(conn, "recruit")) == 1  # the entry read, bumped meanwhile, is still pending
        assert deliver(conn, "recruit", cache.invalidate, lock_wait=10).outcome == "delivered"
        assert pending_entries(conn, "recruit") == []
        assert read_stats(stats).invalidations == {"recruit": 2}


def test_a_failed_call_keeps_the_entries_pending_with_the_error(dsn: str, tmp_path: Path, hook) -> None:
    _request(dsn, "run-1")
    server, stats = _server(tmp_path, "--fail-first", "1")
    with server, psycopg.connect(dsn) as conn:
        cache = hook(server.target)
        with pytest.raises(CacheInvalidationError, match="UNAVAILABLE"):
            deliver(conn, "recruit", cache.invalidate, lock_wait=10)
        row = conn.execute("SELECT attempts, last_error, delivered_at FROM embedding_cache_outbox").fetchone()
        assert row is not None and row[0] == 1 and "injected failure of call 1" in row[1] and row[2] is None
        conn.commit()
        assert deliver(conn, "recruit", cache.invalidate, lock_wait=10).outcome == "delivered"
        row = conn.execute("SELECT attempts, last_error, delivered_at FROM embedding_cache_outbox").fetchone()
        assert row is not None and row[0] == 2 and row[1] is None and row[2] is not None
    assert (read_stats(stats).calls, read_stats(stats).successes) == (2, 1)


def test_the_lock_wait_is_bounded(dsn: str) -> None:
    _request(dsn, "run-1")
    with psycopg.connect(dsn) as holder, psycopg.connect(dsn) as waiter:
        with holder.transaction():
            lock_target(holder, "recruit")
            outcome = deliver(waiter, "recruit", lambda _: pytest.fail("no call expected"), lock_wait=0.3)
        assert outcome == Delivery("recruit", "busy")
        assert len(pending_entries(waiter, "recruit")) == 1


def test_deliver_refuses_an_open_transaction(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(ValueError, match="no transaction open"):
            deliver(conn, "recruit", lambda _: None, lock_wait=1)


def test_ten_concurrent_deliveries_make_at_most_two_calls(dsn: str, tmp_path: Path, hook) -> None:
    for i in range(10):
        _request(dsn, f"run-{i}")
    # Each call takes a second, so the deliverers really overlap.
    server, stats = _server(tmp_path, "--delay", "1")
    with server:
        cache = hook(server.target)
        assert cache.channel is not None  # open the shared channel before the threads use it
        start = threading.Barrier(10)

        def one() -> str:
            with psycopg.connect(dsn) as conn:
                start.wait()
                return deliver(conn, "recruit", cache.invalidate, lock_wait=30).outcome

        with ThreadPoolExecutor(10) as pool:
            outcomes = list(pool.map(lambda _: one(), range(10)))
        counters = read_stats(stats)
    assert 1 <= counters.calls <= 2 and counters.successes == counters.calls
    assert outcomes.count("delivered") == counters.calls and set(outcomes) <= {"delivered", "nothing_pending"}
    with psycopg.connect(dsn) as conn:
        assert pending_targets(conn) == []
