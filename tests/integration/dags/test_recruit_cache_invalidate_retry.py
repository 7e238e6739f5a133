"""``recruit_cache_invalidate_retry`` run for real (``airflow dags test``) against the reference API server.

The story of docs/design.md §11: the API server is down when the ingest's invalidation runs, so the run
succeeds with its entry pending; the server comes back; the retry DAG delivers the entry once, and
a second run has nothing to do.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import psycopg
import pytest

from airflow_embedding_provider.storage.outbox import CacheRequest, pending_targets, request_invalidation
from airflow_embedding_provider.storage.schema import TableNames, apply_schema
from dev.api_server.service import read_stats
from dev.stack import DAGS_FOLDER, ServerProcess, airflow_env, dags_test, free_port, task_result

DAG_ID = "recruit_cache_invalidate_retry"
# The last task of an ingest run, as the ingest DAG wires it; alone in its own DAG folder here.
INGEST_TAIL_DAG = """
import pendulum
from airflow.sdk import DAG
from airflow_embedding_provider.operators.cache_invalidate import CacheInvalidateOperator

with DAG(dag_id="ingest_tail", schedule=None, start_date=pendulum.datetime(2025, 12, 11, tz="UTC")):
    CacheInvalidateOperator(
        task_id="invalidate_cache",
        target="recruit",
        postgres_conn_id="postgres_default",
        grpc_conn_id="cache_grpc_default",
    )
"""


def _outbox(dsn: str) -> list[tuple[str, int, bool]]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT target, attempts, delivered_at IS NOT NULL FROM embedding_cache_outbox ORDER BY id"
        ).fetchall()
    return [(str(t), int(a), bool(d)) for t, a, d in rows]


def test_pending_invalidations_are_delivered_once_when_the_server_is_back(
    airflow_home: Path, pg_dsn: str, tmp_path: Path
) -> None:
    with psycopg.connect(pg_dsn) as conn:
        apply_schema(conn, 8)
        with conn.cursor() as cur:  # what the ingest's chunk writer records with its data
            request_invalidation(cur, TableNames(), CacheRequest("recruit", "recruit_embedding_ingest/run-1/0"))
            request_invalidation(cur, TableNames(), CacheRequest("company", "recruit_embedding_ingest/run-1/1"))
    cache_target = f"127.0.0.1:{free_port()}"  # nothing listens there yet
    env = airflow_env(airflow_home, postgres_dsn=pg_dsn, embedding_target="127.0.0.1:1", cache_target=cache_target)

    # The server is down: the ingest's last task succeeds and says pending.
    tail_folder = tmp_path / "ingest_tail"
    tail_folder.mkdir()
    (tail_folder / "ingest_tail.py").write_text(INGEST_TAIL_DAG, encoding="utf-8")
    dags_test("ingest_tail", {**env, "AIRFLOW__CORE__DAGS_FOLDER": str(tail_folder)})
    result = task_result(airflow_home, "ingest_tail", "invalidate_cache")
    assert (result["status"], result["calls"], result["entries"]) == ("pending", 3, 1)
    assert "UNAVAILABLE" in result["error"]

    # Still down: the retry DAG fails visibly and keeps every entry pending.
    failed = dags_test(DAG_ID, env, check=False)
    assert failed.returncode != 0
    assert "cache invalidation of 'recruit' is still pending after 3 call(s)" in failed.stdout + failed.stderr
    assert _outbox(pg_dsn) == [("recruit", 6, False), ("company", 3, False)]

    stats = tmp_path / "stats.json"
    with ServerProcess(["api-server", "--stats-file", str(stats)], port=int(cache_target.rsplit(":", 1)[1])):
        dags_test(DAG_ID, env)
        counters = read_stats(stats)
        assert (counters.calls, counters.successes) == (2, 2)
        assert counters.invalidations == {"recruit": 1, "company": 1}  # each target exactly once
        assert [delivered for _, _, delivered in _outbox(pg_dsn)] == [True, True]

        # Nothing is pending any more: the next run makes no call.
        dags_test(DAG_ID, env)
        assert read_stats(stats).calls == 2
    with psycopg.connect(pg_dsn) as conn:
        assert pending_targets(conn) == []


@pytest.mark.parametrize(("value", "expected"), [(None, "*/5 * * * *"), ("none", None), ("@hourly", "@hourly")])
def test_the_schedule_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: str | None
) -> None:
    if value is None:
        monkeypatch.delenv("RECRUIT_CACHE_RETRY_SCHEDULE", raising=False)
    else:
        monkeypatch.setenv("RECRUIT_CACHE_RETRY_SCHEDULE", value)
    dag = runpy.run_path(str(DAGS_FOLDER / f"{DAG_ID}.py"))["dag"]
    assert dag.schedule == expected and dag.catchup is False
