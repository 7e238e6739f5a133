"""Faults caused for real during ``recruit_embedding_ingest`` runs over 100,000 rows.

Each ends with the tables equal to the source (every id, field and vector), no duplicate (primary
keys), an empty DLQ and the checkpoint at the last id, never having moved backwards.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.storage.schema import apply_schema
from dev.embedded_postgres import EmbeddedPostgres
from dev.stack import (
    ServerProcess,
    prepare_airflow_home,
    start_dags_test,
    task_result,
)
from tests.integration.faults.helpers import (
    CONF,
    DAG_ID,
    CheckpointWatch,
    assert_exact,
    cluster_env,
    fault_env,
    kill_tasks_mid_run,
    partition_progress,
    plans,
    wait_for,
)


def test_postgres_restarted_mid_run(
    own_postgres: EmbeddedPostgres,
    big_ai_server: ServerProcess,
    api_server: ServerProcess,
    airflow_home: Path,
    big_dataset: EmbeddingDataset,
    tmp_path: Path,
) -> None:
    dsn = own_postgres.create_database("restart")
    log = tmp_path / "dags-test.log"
    with CheckpointWatch(dsn) as watch:
        proc = start_dags_test(DAG_ID, fault_env(airflow_home, dsn, big_ai_server, api_server), log_path=log, conf=CONF)
        wait_for(lambda: any(committed for _, committed, _ in partition_progress(dsn)))
        own_postgres.restart()  # fast shutdown: every open connection is cut
        assert proc.wait(600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    # The restart cut a task's connection (in a query: AdminShutdown; idle: "the connection is
    # lost"); Airflow retried the task, and the retry resumed its range.
    assert re.search(r"psycopg\.(errors\.AdminShutdown|OperationalError)", text), text[-3000:]
    assert "new_state=up_for_retry" in text
    summary = task_result(airflow_home, DAG_ID, "finalize")
    assert summary["partitions"] == 4
    assert_exact(dsn, big_dataset, watch)


def test_run_killed_with_sigkill_then_run_again(
    own_postgres: EmbeddedPostgres,
    big_ai_server: ServerProcess,
    api_server: ServerProcess,
    airflow_home: Path,
    big_dataset: EmbeddingDataset,
    tmp_path: Path,
) -> None:
    dsn = own_postgres.create_database("sigkill")
    env = fault_env(airflow_home, dsn, big_ai_server, api_server)
    with CheckpointWatch(dsn) as watch:
        proc = start_dags_test(DAG_ID, env, log_path=tmp_path / "killed.log", conf=CONF)
        # Partition 0 committed part of its range, and the run is not finished: kill it mid-batch.
        wait_for(lambda: any(i == 0 and c is not None for i, c, _ in partition_progress(dsn)))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        progress = partition_progress(dsn)
        assert not all(done for *_, done in progress), "the run finished before it was killed"
        with psycopg.connect(dsn) as conn:
            watermark = conn.execute("SELECT last_processed_uuid::text FROM embedding_batch_checkpoint").fetchone()
            stored = conn.execute("SELECT count(*) FROM recruit_metadata").fetchone()
        assert watermark is not None and watermark[0] < big_dataset.ids[-1]
        assert stored is not None and 0 < stored[0] < len(big_dataset)
        # The next run compares the ranges with what is stored: it sends exactly the rows missing.
        again = start_dags_test(DAG_ID, env, log_path=tmp_path / "again.log", conf=CONF)
        assert again.wait(600) == 0, (tmp_path / "again.log").read_text()[-3000:]
    summary = task_result(airflow_home, DAG_ID, "finalize")
    assert summary["rows_received"] == summary["inserted"] == len(big_dataset) - stored[0], summary
    assert_exact(dsn, big_dataset, watch)


def _lock_waiters(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def test_two_runs_at_once(
    postgres: EmbeddedPostgres,
    big_ai_server: ServerProcess,
    api_server: ServerProcess,
    airflow_home: Path,
    big_dataset: EmbeddingDataset,
    tmp_path: Path,
) -> None:
    """Two deployments (two Airflow homes) ingest the same source into one database at once.

    Airflow's start-up takes longer than the ingest itself here, so left alone the two runs would
    barely overlap. A session holding the checkpoint table's lock keeps both runs' first writes
    waiting until both have planned and started writing; then it lets go and they race for the
    same rows.
    """
    dsn = postgres.create_database("two_runs")
    second_home = tmp_path / "second-home"
    env2 = fault_env(second_home, dsn, big_ai_server, api_server)
    prepare_airflow_home(env2)
    with psycopg.connect(dsn) as gate:
        apply_schema(gate, len(big_dataset.vectors[0]))
        gate.commit()
        gate.execute("LOCK TABLE embedding_batch_checkpoint IN EXCLUSIVE MODE")  # reads pass, writes wait
        with CheckpointWatch(dsn) as watch:
            procs = [
                start_dags_test(
                    DAG_ID,
                    fault_env(airflow_home, dsn, big_ai_server, api_server),
                    log_path=tmp_path / "a.log",
                    conf=CONF,
                ),
                start_dags_test(DAG_ID, env2, log_path=tmp_path / "b.log", conf=CONF),
            ]
            # Both runs planned (two plans stored) and writers of both wait: the first run's two
            # writers on the lock, the second's on the first's rows or on the lock.
            wait_for(lambda: len({run for run, *_ in plans(dsn)}) == 2 and _lock_waiters(dsn) >= 3)
            gate.rollback()
            codes = [p.wait(900) for p in procs]
    assert codes == [0, 0], [(tmp_path / n).read_text()[-2000:] for n in ("a.log", "b.log")]
    totals = [task_result(home, DAG_ID, "finalize") for home in (airflow_home, second_home)]
    print("two runs:", [(t["inserted"], t["unchanged"], t["updated"]) for t in totals])
    # Each run sends the rows not stored when its tasks compared their ranges (all, for a task that
    # compared before the other run's first commit).
    assert all(0 < t["rows_received"] <= len(big_dataset) for t in totals), totals
    assert sum(t["inserted"] for t in totals) == len(big_dataset), totals  # each row inserted by one run
    assert_exact(dsn, big_dataset, watch)


@pytest.mark.timeout(1200)
def test_mapped_tasks_sigkilled_under_the_scheduler_resume_inside_their_ranges(
    postgres: EmbeddedPostgres,
    big_ai_server: ServerProcess,
    api_server: ServerProcess,
    big_dataset: EmbeddingDataset,
    tmp_path: Path,
) -> None:
    """The real scheduler (LocalExecutor) runs 2 mapped ingest tasks in parallel; both task
    processes are SIGKILLed once a partition has committed part of its range. Airflow marks the
    tries failed and retries them; each retry resumes after what its partition committed."""
    dsn = postgres.create_database("task_kill")
    metadata_dsn = postgres.create_database("airflow_task_kill_meta")
    env = cluster_env(tmp_path / "home", dsn, metadata_dsn, big_ai_server, api_server)
    result = kill_tasks_mid_run(
        env,
        dsn,
        tmp_path / "logs",
        conf=CONF | {"rows_per_partition": 50_000},
        ready=lambda progress: any(c is not None and not done for _, c, done in progress),
    )
    at_kill, tries, summary, watch = result.at_kill, result.tries, result.summary, result.watch
    committed_before = [c for _, c, done in at_kill if c is not None and not done]
    assert committed_before, at_kill
    print("task kill:", at_kill, tries, summary)
    assert len(tries) == 2 and max(tries.values()) >= 2, tries  # Airflow retried the killed tries
    # The retries resumed inside their ranges: the rows committed before the kill were not sent
    # again, and every row is stored exactly once, bit-exact.
    assert 0 < summary["rows_received"] < len(big_dataset), summary
    assert_exact(dsn, big_dataset, watch)
