"""What the fault tests (and the Celery worker test) share: the ingest DAG's run against a killed
or restarted piece, the partitions' progress, a checkpoint watch and the exactness check."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from dev.airflow_cluster import AirflowCluster
from dev.stack import ServerProcess, airflow_env
from dev.verify import compare

DAG_ID = "recruit_embedding_ingest"
CONF = {"rows_per_partition": 25_000, "chunk_size": 500, "sub_batch_size": 250}


def fault_env(home: Path, dsn: str, ai: ServerProcess, api: ServerProcess) -> dict[str, str]:
    return airflow_env(
        home,
        postgres_dsn=dsn,
        embedding_target=ai.target,
        cache_target=api.target,
        extra={"RECRUIT_EMBEDDING_RETRIES": "3", "RECRUIT_EMBEDDING_RETRY_DELAY": "1"},
    )


def partition_progress(dsn: str) -> list[tuple[int, str | None, bool]]:
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


def plans(dsn: str) -> list[tuple[str, int]]:
    with psycopg.connect(dsn, connect_timeout=2) as conn:
        return conn.execute("SELECT run_id, partition_index FROM embedding_partition_progress").fetchall()


def wait_for(predicate: Callable[[], bool], timeout: float = 300) -> None:
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


def assert_exact(dsn: str, dataset: EmbeddingDataset, watch: CheckpointWatch) -> None:
    with psycopg.connect(dsn) as conn:
        check = compare(conn, dataset)
        assert check.equal, check.summary()
        assert conn.execute("SELECT count(*) FROM recruit_embedding_dlq").fetchone() == (0,)
        checkpoint = conn.execute("SELECT last_processed_uuid::text FROM embedding_batch_checkpoint").fetchone()
    assert checkpoint == (dataset.ids[-1],)
    assert watch.seen == sorted(watch.seen), "the checkpoint moved backwards"
    assert watch.seen[-1] == dataset.ids[-1]


def task_processes(dsn: str) -> list[psutil.Process]:
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


@dataclass
class KilledRun:
    """What :func:`kill_tasks_mid_run` saw: the partitions' progress at the kill, the tries of each
    mapped ingest task, the finalize summary, the checkpoint's samples, and what ``at_kill`` returned."""

    at_kill: list[tuple[int, str | None, bool]]
    tries: dict[int, int]
    summary: dict[str, Any]
    watch: CheckpointWatch
    noted: Any = None


def kill_tasks_mid_run(
    env: dict[str, str],
    dsn: str,
    log_dir: Path,
    *,
    conf: dict[str, Any],
    ready: Callable[[list[tuple[int, str | None, bool]]], bool],
    at_kill: Callable[[], Any] | None = None,
) -> KilledRun:
    """Run the ingest DAG under the real scheduler (``AirflowCluster``), SIGKILL every task process
    once ``ready(progress)`` holds, and wait for the run, which must succeed through Airflow's retries."""
    cluster = AirflowCluster(env, log_dir=log_dir)
    try:
        cluster.migrate()
        cluster.start()
        cluster.wait_for_dag(DAG_ID)
        cluster.set_paused(DAG_ID, False)
        with CheckpointWatch(dsn) as watch:
            run_id = cluster.trigger(DAG_ID, conf)
            wait_for(lambda: ready(partition_progress(dsn)), timeout=600)
            killed = task_processes(dsn)
            assert killed, "no task process holds a connection"
            for proc in killed:
                proc.kill()  # SIGKILL: no cleanup, no rollback from the client side
            progress_at_kill = partition_progress(dsn)
            noted = at_kill() if at_kill is not None else None
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
    return KilledRun(progress_at_kill, tries, summary, watch, noted)


def cluster_env(home: Path, dsn: str, metadata_dsn: str, ai: ServerProcess, api: ServerProcess) -> dict[str, str]:
    """:func:`fault_env` for a real scheduler: Airflow's metadata in PostgreSQL, no schedule."""
    return fault_env(home, dsn, ai, api) | {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_dsn.replace("postgresql://", "postgresql+psycopg://"),
        "RECRUIT_EMBEDDING_SCHEDULE": "none",
    }
