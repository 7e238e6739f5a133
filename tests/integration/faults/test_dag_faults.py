"""Faults caused for real during ``recruit_embedding_ingest`` runs over 100,000 rows.

Each ends with the tables equal to the source (every id, field and vector), no duplicate (primary
keys), an empty DLQ and the checkpoint at the last id, never having moved backwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.storage.schema import apply_schema
from dev.airflow_cluster import AirflowCluster
from dev.embedded_postgres import EmbeddedPostgres
from dev.stack import (
    ServerProcess,
    airflow_env,
    prepare_airflow_home,
    start_dags_test,
    task_result,
)
from dev.verify import compare

DAG_ID = "recruit_embedding_ingest"
CONF = {"rows_per_partition": 25_000, "chunk_size": 500, "sub_batch_size": 250}


@pytest.fixture
def big_ai_server(big_pkl: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(["ai-server", "--pkl", str(big_pkl)], log_path=tmp_path / "ai.log") as server:
        yield server


def _env(home: Path, dsn: str, ai: ServerProcess, api: ServerProcess) -> dict[str, str]:
    return airflow_env(
        home,
        postgres_dsn=dsn,
        embedding_target=ai.target,
        cache_target=api.target,
        extra={"RECRUIT_EMBEDDING_RETRIES": "3", "RECRUIT_EMBEDDING_RETRY_DELAY": "1"},
    )


def _progress(dsn: str) -> list[tuple[int, str | None, bool]]:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            if conn.execute("SELECT to_regclass('embedding_partition_progress')").fetchone() == (None,):
                return []
            return conn.execute(
                "SELECT partition_index, committed_uuid::text, done FROM embedding_partition_progress "
                "ORDER BY run_id, partition_index"
            ).fetchall()
    except psycopg.OperationalError:
        return []


def _plans(dsn: str) -> list[tuple[str, int]]:
    with psycopg.connect(dsn, connect_timeout=2) as conn:
        return conn.execute("SELECT run_id, partition_index FROM embedding_partition_progress").fetchall()


def _wait_for(predicate: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the run never got there")
        time.sleep(0.1)


class CheckpointWatch:
    """Samples the stored checkpoint on a thread, to show it never moves backwards."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    row = conn.execute(
                        "SELECT last_processed_uuid::text FROM embedding_batch_checkpoint WHERE stream_name = 'recruit'"
                    ).fetchone()
                if row and (not self.seen or self.seen[-1] != row[0]):
                    self.seen.append(row[0])
            except psycopg.Error:
                pass  # the table is not there yet, or the server is restarting
            time.sleep(0.05)

    def __enter__(self) -> CheckpointWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _assert_exact(dsn: str, dataset: EmbeddingDataset, watch: CheckpointWatch) -> None:
    with psycopg.connect(dsn) as conn:
        check = compare(conn, dataset)
        assert check.equal, check.summary()
        assert conn.execute("SELECT count(*) FROM recruit_embedding_dlq").fetchone() == (0,)
        checkpoint = conn.execute("SELECT last_processed_uuid::text FROM embedding_batch_checkpoint").fetchone()
    assert checkpoint == (dataset.ids[-1],)
    assert watch.seen == sorted(watch.seen), "the checkpoint moved backwards"
    assert watch.seen[-1] == dataset.ids[-1]


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
        proc = start_dags_test(DAG_ID, _env(airflow_home, dsn, big_ai_server, api_server), log_path=log, conf=CONF)
        _wait_for(lambda: any(committed for _, committed, _ in _progress(dsn)))
        own_postgres.restart()  # fast shutdown: every open connection is cut
        assert proc.wait(600) == 0, log.read_text()[-3000:]
    text = log.read_text()
    # The restart cut a task's connection (in a query: AdminShutdown; idle: "the connection is
    # lost"); Airflow retried the task, and the retry resumed its range.
    assert re.search(r"psycopg\.(errors\.AdminShutdown|OperationalError)", text), text[-3000:]
    assert "new_state=up_for_retry" in text
    summary = task_result(airflow_home, DAG_ID, "finalize")
    assert summary["partitions"] == 4
    _assert_exact(dsn, big_dataset, watch)


def test_run_killed_with_sigkill_then_run_again(
    own_postgres: EmbeddedPostgres,
    big_ai_server: ServerProcess,
    api_server: ServerProcess,
    airflow_home: Path,
    big_dataset: EmbeddingDataset,
    tmp_path: Path,
) -> None:
    dsn = own_postgres.create_database("sigkill")
    env = _env(airflow_home, dsn, big_ai_server, api_server)
    with CheckpointWatch(dsn) as watch:
        proc = start_dags_test(DAG_ID, env, log_path=tmp_path / "killed.log", conf=CONF)
        # Partition 0 committed part of its range, and the run is not finished: kill it mid-batch.
        _wait_for(lambda: any(i == 0 and c is not None for i, c, _ in _progress(dsn)))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        progress = _progress(dsn)
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
    _assert_exact(dsn, big_dataset, watch)


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
    env2 = _env(second_home, dsn, big_ai_server, api_server)
    prepare_airflow_home(env2)
    with psycopg.connect(dsn) as gate:
        apply_schema(gate, len(big_dataset.vectors[0]))
        gate.commit()
        gate.execute("LOCK TABLE embedding_batch_checkpoint IN EXCLUSIVE MODE")  # reads pass, writes wait
        with CheckpointWatch(dsn) as watch:
            procs = [
                start_dags_test(
                    DAG_ID, _env(airflow_home, dsn, big_ai_server, api_server), log_path=tmp_path / "a.log", conf=CONF
                ),
                start_dags_test(DAG_ID, env2, log_path=tmp_path / "b.log", conf=CONF),
            ]
            # Both runs planned (two plans stored) and writers of both wait: the first run's two
            # writers on the lock, the second's on the first's rows or on the lock.
            _wait_for(lambda: len({run for run, *_ in _plans(dsn)}) == 2 and _lock_waiters(dsn) >= 3)
            gate.rollback()
            codes = [p.wait(900) for p in procs]
    assert codes == [0, 0], [(tmp_path / n).read_text()[-2000:] for n in ("a.log", "b.log")]
    totals = [task_result(home, DAG_ID, "finalize") for home in (airflow_home, second_home)]
    print("two runs:", [(t["inserted"], t["unchanged"], t["updated"]) for t in totals])
    # Each run sends the rows not stored when its tasks compared their ranges (all, for a task that
    # compared before the other run's first commit).
    assert all(0 < t["rows_received"] <= len(big_dataset) for t in totals), totals
    assert sum(t["inserted"] for t in totals) == len(big_dataset), totals  # each row inserted by one run
    _assert_exact(dsn, big_dataset, watch)


def _task_processes(dsn: str) -> list[psutil.Process]:
    """Processes other than this one with a connection to the database of ``dsn``: the running
    ingest tasks (a task's code, and so its connections, live in the child its supervisor forks)."""
    with psycopg.connect(dsn) as conn:
        server_port = conn.info.port
        ports = {
            r[0]
            for r in conn.execute(
                "SELECT client_port FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        }
    pids = {
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.pid and c.pid != os.getpid() and c.raddr and c.raddr.port == server_port and c.laddr.port in ports
    }
    return [psutil.Process(pid) for pid in sorted(pids)]


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
    metadata_dsn = postgres.create_database("airflow_task_kill_meta").replace("postgresql://", "postgresql+psycopg://")
    env = _env(tmp_path / "home", dsn, big_ai_server, api_server) | {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_dsn,
        "RECRUIT_EMBEDDING_SCHEDULE": "none",
    }
    cluster = AirflowCluster(env, log_dir=tmp_path / "logs")
    try:
        cluster.migrate()
        cluster.start()
        cluster.wait_for_dag(DAG_ID)
        cluster.set_paused(DAG_ID, False)
        with CheckpointWatch(dsn) as watch:
            run_id = cluster.trigger(DAG_ID, CONF | {"rows_per_partition": 50_000})
            _wait_for(lambda: any(c is not None and not done for _, c, done in _progress(dsn)), timeout=600)
            killed = _task_processes(dsn)
            assert killed, "no task process holds a connection"
            for proc in killed:
                proc.kill()  # SIGKILL: no cleanup, no rollback from the client side
            at_kill = _progress(dsn)
            run = cluster.wait_for_run(DAG_ID, run_id=run_id)
        tries = {ti["map_index"]: ti["try_number"] for ti in cluster.task_instances(run) if ti["task_id"] == "ingest"}
        states = cluster.task_states(run)
        assert set(states.values()) == {"success"}, states
        summary = cluster.xcom(run, "finalize")
        summary = json.loads(summary) if isinstance(summary, str) else summary
    except BaseException:
        print(cluster.log_tails())
        raise
    finally:
        cluster.stop()
    committed_before = [c for _, c, done in at_kill if c is not None and not done]
    assert committed_before, at_kill
    print("task kill:", at_kill, tries, summary)
    assert len(tries) == 2 and max(tries.values()) >= 2, tries  # Airflow retried the killed tries
    # The retries resumed inside their ranges: the rows committed before the kill were not sent
    # again, and every row is stored exactly once, bit-exact.
    assert 0 < summary["rows_received"] < len(big_dataset), summary
    _assert_exact(dsn, big_dataset, watch)
