"""CacheInvalidateOperator against the real reference API server and a real PostgreSQL.

The operator runs in process (``execute``); its return value is the task's XCom.
"""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_embedding_provider.hooks.grpc_cache import CacheInvalidationError
from airflow_embedding_provider.operators.cache_invalidate import (
    CacheInvalidateOperator,
    CacheInvalidationPendingError,
)
from airflow_embedding_provider.storage.outbox import CacheRequest, pending_targets, request_invalidation
from airflow_embedding_provider.storage.schema import TableNames, apply_schema
from dev.api_server.service import read_stats
from dev.stack import ServerProcess, free_port

FAST: dict[str, Any] = {"initial_backoff": 0.1, "max_backoff": 0.5}


def _point_cache_at(monkeypatch: pytest.MonkeyPatch, target: str, timeout: float = 5) -> None:
    host, port = target.rsplit(":", 1)
    monkeypatch.setenv(
        "AIRFLOW_CONN_CACHE_GRPC_DEFAULT",
        json.dumps({"conn_type": "embedding_grpc", "host": host, "port": int(port), "extra": {"timeout": timeout}}),
    )


@pytest.fixture
def outbox_dsn(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A database with one pending ``recruit`` entry, as ``postgres_default``."""
    with psycopg.connect(pg_dsn) as conn:
        apply_schema(conn, 8)
        with conn.cursor() as cur:
            request_invalidation(cur, TableNames(), CacheRequest("recruit", "ingest/run-1/0"))
    monkeypatch.setenv("AIRFLOW_CONN_POSTGRES_DEFAULT", pg_dsn)
    return pg_dsn


def _operator(**kwargs: Any) -> CacheInvalidateOperator:
    return CacheInvalidateOperator(task_id="invalidate_cache", postgres_conn_id="postgres_default", **FAST, **kwargs)


def _outbox(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT attempts, last_error, delivered_at IS NOT NULL FROM embedding_cache_outbox ORDER BY id"
        ).fetchall()


def test_a_flapping_server_is_delivered_to_within_the_retries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outbox_dsn: str
) -> None:
    stats = tmp_path / "stats.json"
    with ServerProcess(["api-server", "--stats-file", str(stats), "--fail-first", "2"]) as server:
        _point_cache_at(monkeypatch, server.target)
        result = _operator().execute({})
    assert result == {"target": "recruit", "status": "delivered", "calls": 3, "entries": 1, "error": None}
    counters = read_stats(stats)
    assert (counters.calls, counters.successes) == (3, 1)
    assert _outbox(outbox_dsn) == [(3, None, True)]


def test_the_deadline_cuts_a_slow_call_and_the_retry_follows(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outbox_dsn: str
) -> None:
    stats = tmp_path / "stats.json"
    with ServerProcess(["api-server", "--stats-file", str(stats), "--delay", "30", "--delay-first", "1"]) as server:
        _point_cache_at(monkeypatch, server.target)
        result = _operator(call_timeout=1).execute({})
    assert (result["status"], result["calls"]) == ("delivered", 2)
    counters = read_stats(stats)
    assert (counters.calls, counters.successes) == (2, 1)
    assert _outbox(outbox_dsn) == [(2, None, True)]


def test_a_server_that_stays_down_leaves_the_entry_pending_and_the_task_succeeds(
    monkeypatch: pytest.MonkeyPatch, outbox_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _point_cache_at(monkeypatch, f"127.0.0.1:{free_port()}", timeout=2)
    result = _operator().execute({})
    assert (result["status"], result["calls"], result["entries"]) == ("pending", 3, 1)
    assert "failed with UNAVAILABLE" in result["error"]
    log = capsys.readouterr().out  # Airflow's task logger writes to stdout outside a task runner
    assert "still pending after 3 call(s)" in log and "recruit_cache_invalidate_retry DAG delivers them" in log
    [(attempts, error, delivered)] = _outbox(outbox_dsn)
    assert attempts == 3 and "UNAVAILABLE" in error and not delivered

    with pytest.raises(CacheInvalidationPendingError, match="1 outbox entries stay pending"):
        _operator(fail_on_pending=True).execute({})


def test_nothing_pending_makes_no_call(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outbox_dsn: str) -> None:
    with psycopg.connect(outbox_dsn) as conn:
        conn.execute("UPDATE embedding_cache_outbox SET delivered_at = NOW()")
    stats = tmp_path / "stats.json"
    with ServerProcess(["api-server", "--stats-file", str(stats)]) as server:
        _point_cache_at(monkeypatch, server.target)
        assert _operator().execute({})["status"] == "nothing_pending"
    assert read_stats(stats).calls == 0


def test_an_error_a_retry_cannot_fix_fails_the_task_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outbox_dsn: str
) -> None:
    stats = tmp_path / "stats.json"
    with ServerProcess(
        ["api-server", "--stats-file", str(stats), "--fail-always", "--fail-code", "UNAUTHENTICATED"]
    ) as server:
        _point_cache_at(monkeypatch, server.target)
        with pytest.raises(CacheInvalidationError, match=r"UNAUTHENTICATED.*not retried"):
            _operator().execute({})
    assert read_stats(stats).calls == 1
    assert _outbox(outbox_dsn)[0][0] == 1  # still pending, with the error


def test_without_an_outbox_it_calls_directly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    with ServerProcess(["api-server", "--stats-file", str(stats), "--fail-first", "1"]) as server:
        _point_cache_at(monkeypatch, server.target)
        op = CacheInvalidateOperator(task_id="invalidate_cache", target="company", **FAST)
        assert op.execute({})["status"] == "invalidated"
    assert read_stats(stats).invalidations == {"company": 1}
    # Nothing would retry it later, so a failure past the retries fails the task.
    _point_cache_at(monkeypatch, f"127.0.0.1:{free_port()}", timeout=2)
    with pytest.raises(CacheInvalidationError, match="UNAVAILABLE"):
        CacheInvalidateOperator(task_id="invalidate_cache", **FAST).execute({})


def _deliver_in_a_process(barrier: Any, results: Any) -> None:
    op = CacheInvalidateOperator(task_id="invalidate_cache", postgres_conn_id="postgres_default", **FAST)
    barrier.wait()
    results.put(op.execute({}))


def test_ten_concurrent_processes_make_at_most_two_calls(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, outbox_dsn: str
) -> None:
    stats = tmp_path / "stats.json"
    # A one-second call, so the ten deliverers overlap while one is in flight.
    with ServerProcess(["api-server", "--stats-file", str(stats), "--delay", "1"]) as server:
        _point_cache_at(monkeypatch, server.target)
        ctx = multiprocessing.get_context("spawn")  # children inherit the connections from os.environ
        barrier, results = ctx.Barrier(10), ctx.Queue()
        procs = [ctx.Process(target=_deliver_in_a_process, args=(barrier, results)) for _ in range(10)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=300) for _ in procs]
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
        counters = read_stats(stats)
    assert 1 <= counters.calls <= 2 and counters.successes == counters.calls
    assert sum(o["calls"] for o in outcomes) == counters.calls
    assert {o["status"] for o in outcomes} <= {"delivered", "nothing_pending"}
    with psycopg.connect(outbox_dsn) as conn:
        assert pending_targets(conn) == []
