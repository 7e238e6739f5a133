"""``recruit_embedding_ingest`` on Airflow's CeleryExecutor: two workers, then one of them killed.

One deployment for the module: a Redis broker, a PostgreSQL metadata database (Celery's result
backend on it too), api-server, scheduler, dag-processor and two ``airflow celery worker``
processes, ``a`` and ``b``, with two task slots each. A run over 100,000 rows in 4 partitions of
25,000 must spread over both workers and store every row exactly. Then the same run again into an
empty database, and the worker that holds a partition which has committed part of its range dies
(SIGKILL, every process it started): the scheduler notices the task's missing heartbeats, Airflow
retries it on the other worker, the retry resumes after what the killed try committed, and the run
ends exact with the checkpoint never moved back.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from dev.airflow_cluster import AirflowCluster
from dev.embedded_postgres import EmbeddedPostgres
from dev.redis_broker import RedisBroker
from dev.stack import ServerProcess, airflow_env
from tests.integration.faults.helpers import CONF, DAG_ID, CheckpointWatch, assert_exact, partition_progress

pytestmark = [pytest.mark.dag, pytest.mark.timeout(1500)]

WORKERS = ("a", "b")
DATABASE = "celery_ingest"
# Missing heartbeats for this long fail a running task (Airflow's default: 300 s); the scheduler
# looks every DETECTION_INTERVAL seconds. Supervisors heartbeat every 5 s ([workers]
# min_heartbeat_interval), so 30 s leaves a loaded machine room for five missed beats.
HEARTBEAT_TIMEOUT = 30
DETECTION_INTERVAL = 5


@dataclass
class Deployment:
    cluster: AirflowCluster
    postgres: EmbeddedPostgres
    dsn: str
    ai_log: Path


@pytest.fixture(scope="module")
def deployment(
    tmp_path_factory: pytest.TempPathFactory, postgres: EmbeddedPostgres, big_pkl: Path, api_server: ServerProcess
) -> Iterator[Deployment]:
    folder = tmp_path_factory.mktemp("celery")
    dsn = postgres.create_database(DATABASE)
    metadata = postgres.create_database("airflow_celery_meta").replace("postgresql://", "postgresql+psycopg://")
    with (
        RedisBroker(folder / "redis") as broker,
        ServerProcess(["ai-server", "--pkl", str(big_pkl)], log_path=folder / "ai.log") as ai,
    ):
        env = airflow_env(
            folder / "home",
            postgres_dsn=dsn,
            embedding_target=ai.target,
            cache_target=api_server.target,
            extra={
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata,
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": str(DETECTION_INTERVAL),
                "RECRUIT_EMBEDDING_RETRIES": "2",
                "RECRUIT_EMBEDDING_RETRY_DELAY": "1",
            },
        )
        cluster = AirflowCluster(
            env, log_dir=folder / "logs", executor="CeleryExecutor", broker_url=broker.url, parallelism=8
        )
        started = time.monotonic()
        try:
            cluster.migrate()
            cluster.start()
            cluster.start_workers(*WORKERS)
            cluster.wait_for_dag(DAG_ID)
            cluster.set_paused(DAG_ID, False)
            print(f"celery deployment up in {time.monotonic() - started:.0f} s")
            yield Deployment(cluster, postgres, dsn, folder / "ai.log")
        except BaseException:
            print(cluster.log_tails())
            raise
        finally:
            cluster.stop()


def _ingest(cluster: AirflowCluster, run: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """map_index -> the ingest task instance (state, try_number, hostname) and its XCom result."""
    tis = {ti["map_index"]: ti for ti in cluster.task_instances(run) if ti["task_id"] == "ingest"}
    for index, ti in tis.items():
        ti["result"] = cluster.xcom(run, "ingest", map_index=index)
    return tis


def _seconds(ti: dict[str, Any]) -> float:
    return (datetime.fromisoformat(ti["end_date"]) - datetime.fromisoformat(ti["start_date"])).total_seconds()


def _span(tis: list[dict[str, Any]]) -> float:
    """Seconds from the first task's start to the last one's end, as Airflow recorded them."""
    start = min(datetime.fromisoformat(ti["start_date"]) for ti in tis)
    return (max(datetime.fromisoformat(ti["end_date"]) for ti in tis) - start).total_seconds()


def _report(label: str, tis: dict[int, dict[str, Any]]) -> None:
    rows = {i: ti["result"]["rows_received"] for i, ti in tis.items()}
    for worker in sorted({ti["hostname"] for ti in tis.values()}):
        mine = [i for i, ti in tis.items() if ti["hostname"] == worker]
        span = _span([tis[i] for i in mine])
        print(
            f"{label}: worker {worker} ran ingest{sorted(mine)}: {sum(rows[i] for i in mine)} rows, "
            f"{span:.1f} s first start to last end, {sum(rows[i] for i in mine) / span:.0f} rows/s"
        )
    span = _span(list(tis.values()))
    print(f"{label}: mapped ingest {sum(rows.values())} rows in {span:.1f} s, {sum(rows.values()) / span:.0f} rows/s")
    for index, ti in sorted(tis.items()):
        r = ti["result"]
        print(
            f"{label}: ingest[{index}] worker {ti['hostname']} try {ti['try_number']} "
            f"rows {r['rows_received']} in {r['seconds']:.1f} s ({r['rows_per_second']:.0f} rows/s in the task, "
            f"{_seconds(ti):.1f} s as Airflow saw it)"
        )


class ConnectionPeak:
    """The most sessions each database had at once while the block ran (sampled), for sizing."""

    def __init__(self, postgres: EmbeddedPostgres) -> None:
        self.postgres = postgres
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.postgres.dsn(), autocommit=True) as conn:
            while not self._stop.is_set():
                for name, count in conn.execute(
                    "SELECT datname, count(*) FROM pg_stat_activity WHERE datname IS NOT NULL "
                    "AND pid <> pg_backend_pid() GROUP BY datname"
                ):
                    self.peak[name] = max(self.peak.get(name, 0), int(count))
                time.sleep(0.05)

    def __enter__(self) -> ConnectionPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_two_celery_workers_share_the_partitions(deployment: Deployment, big_dataset: EmbeddingDataset) -> None:
    cluster, dsn = deployment.cluster, deployment.dsn
    started = time.monotonic()
    with CheckpointWatch(dsn) as watch, ConnectionPeak(deployment.postgres) as sessions:
        run = cluster.wait_for_run(DAG_ID, run_id=cluster.trigger(DAG_ID, CONF))
    print(f"two-worker run: {time.monotonic() - started:.0f} s")
    print("peak sessions a database during the run:", sessions.peak)
    tis = _ingest(cluster, run)
    _report("two workers", tis)
    assert sorted(tis) == [0, 1, 2, 3]
    assert {ti["state"] for ti in tis.values()} == {"success"}
    # A worker takes one task a slot (prefetch 1) and has two slots, so it cannot take all 4
    # partitions at once: both run some (2 and 2 in every run so far).
    by_worker = {w: sorted(i for i, ti in tis.items() if ti["hostname"] == w) for w in WORKERS}
    assert all(by_worker.values()), by_worker
    assert sum(ti["result"]["rows_received"] for ti in tis.values()) == len(big_dataset)
    assert {ti["try_number"] for ti in tis.values()} == {1}
    summary = cluster.xcom(run, "finalize")
    print("two-worker run total:", {k: summary[k] for k in ("rows_received", "seconds", "rows_per_second")})
    assert_exact(dsn, big_dataset, watch)


def _rows_committed(dataset: EmbeddingDataset, after: str | None, committed: str) -> int:
    """Rows of a partition that starts after ``after`` up to and including ``committed``."""
    start = 0 if after is None else dataset.ids.index(after) + 1
    return dataset.ids.index(committed) + 1 - start


def _rows_sent(ai_log: Path, offset: int) -> int:
    """Rows the AI server streamed (every ``GetEmbeddings``, cut ones too) since ``offset`` of its log."""
    with open(ai_log, "rb") as f:
        f.seek(offset)
        return sum(int(m) for m in re.findall(rb"GetEmbeddings .* rows=(\d+) ", f.read()))


def _freeze_mid_partition(cluster: AirflowCluster, run: dict[str, Any], dsn: str, gate: psycopg.Connection) -> int:
    """Hold every writer still while a running partition has committed part of its range; its map index.

    On this machine a 25,000-row partition takes a second or two, shorter than one look at the task
    instances. So as soon as a partition has committed something, ``gate`` takes the checkpoint
    table's lock, which every chunk transaction needs before it commits: the writers wait (a real
    lock, nothing faked) and the partition stays part-committed until the gate lets go.
    """
    deadline = time.monotonic() + 600
    while True:
        assert time.monotonic() < deadline, "no partition ever committed part of its range"
        cluster.check_alive()
        if any(c is not None and not done for _, c, done in partition_progress(dsn)):
            gate.execute("LOCK TABLE embedding_batch_checkpoint IN EXCLUSIVE MODE")  # reads pass, writes wait
            partial = sorted(i for i, c, done in partition_progress(dsn) if c is not None and not done)
            states = {ti["map_index"]: ti["state"] for ti in cluster.task_instances(run) if ti["task_id"] == "ingest"}
            held = [i for i in partial if states.get(i) == "running"]
            if held:
                return held[0]
            gate.rollback()  # finished in between: let it go and look again
        time.sleep(0.02)


def test_a_celery_worker_killed_mid_partition(
    deployment: Deployment, big_dataset: EmbeddingDataset, api_server: ServerProcess
) -> None:
    cluster = deployment.cluster
    dsn = deployment.postgres.create_database(DATABASE)  # the same database, empty again
    ai_log = deployment.ai_log
    ai_offset = ai_log.stat().st_size
    started = time.monotonic()
    with CheckpointWatch(dsn) as watch, psycopg.connect(dsn) as gate:
        run_id = cluster.trigger(DAG_ID, CONF)
        run = {"dag_id": DAG_ID, "dag_run_id": run_id}
        held = _freeze_mid_partition(cluster, run, dsn, gate)
        # A task a worker has taken stays "queued" until its process starts, and one killed then
        # would wait for [scheduler] task_queued_timeout instead. 4 partitions fit the 4 slots: while
        # the writers are frozen, wait until every ingest task runs (or ran), so that the tries the
        # kill ends are all known.
        deadline = time.monotonic() + 300
        while True:
            tis = {ti["map_index"]: ti for ti in cluster.task_instances(run) if ti["task_id"] == "ingest"}
            if all(ti["state"] in ("running", "success") for ti in tis.values()):
                break
            assert time.monotonic() < deadline, f"not every ingest task started: {cluster.task_states(run)}"
            time.sleep(0.5)
        victim = tis[held]["hostname"]
        # The tries that die with the worker: every ingest task it is running.
        victims = sorted(i for i, ti in tis.items() if ti["hostname"] == victim and ti["state"] == "running")
        killed_pids = cluster.kill_worker(victim)
        killed_at = time.monotonic()
        gate.rollback()  # the other worker's writers go on
        time.sleep(2)  # the killed tries' sessions end (rolled back) once PostgreSQL sees them gone
        at_kill = {i: c for i, c, _ in partition_progress(dsn)}
        groups = len(set(killed_pids.values()))
        print(
            f"killed worker {victim} ({len(killed_pids)} processes in {groups} process groups) holding "
            f"ingest{victims}; committed: {at_kill}"
        )

        noticed: dict[int, float] = {}
        retried: dict[int, float] = {}
        while len(retried) < len(victims):
            assert time.monotonic() - killed_at < 600, f"no retry after 600 s: {cluster.task_states(run)}"
            cluster.check_alive()
            for ti in cluster.task_instances(run):
                i = ti["map_index"]
                if ti["task_id"] != "ingest" or i not in victims:
                    continue
                if ti["try_number"] > 1 or ti["state"] != "running":
                    noticed.setdefault(i, time.monotonic() - killed_at)
                if ti["try_number"] > 1 and ti["state"] in ("running", "success"):
                    retried.setdefault(i, time.monotonic() - killed_at)
            time.sleep(0.5)
        run = cluster.wait_for_run(DAG_ID, run_id=run_id)
    print(f"kill run: {time.monotonic() - started:.0f} s")
    tis = _ingest(cluster, run)
    _report("worker killed", tis)
    assert {ti["state"] for ti in tis.values()} == {"success"}
    # The scheduler failed the killed tries for their missing heartbeats (and nothing else).
    detected = re.findall(
        r"Detected a task instance without a heartbeat.*?'Map Index': (\d+), 'Hostname': '(\w+)'",
        cluster.log_path("scheduler").read_text(errors="replace"),
    )
    assert sorted((int(i), host) for i, host in detected) == [(i, victim) for i in victims], detected
    survivor = next(w for w in WORKERS if w != victim)
    plan = {p["index"]: p for p in cluster.xcom(run, "plan_partitions")}
    resumable = 0
    for i in victims:
        ti, committed, part = tis[i], at_kill[i], plan[i]
        done_before = 0 if committed is None else _rows_committed(big_dataset, part["after_uuid"], committed)
        received = ti["result"]["rows_received"]
        print(
            f"ingest[{i}]: noticed {noticed[i]:.1f} s after the kill, try {ti['try_number']} running on "
            f"{ti['hostname']} at {retried[i]:.1f} s; {done_before} of {part['rows']} rows committed before the "
            f"kill, the retry received {received}"
        )
        # Retried once, on the worker still there, after what the killed try committed.
        assert ti["try_number"] == 2 and ti["hostname"] == survivor, ti
        assert ti["result"]["start_after"] == (committed or part["after_uuid"]), (ti["result"], committed)
        # A range sync's retry asks only for the rows not stored (README "Range sync"): at most
        # those after the committed position, fewer when sub-batches beyond it had committed too.
        assert 0 < received <= part["rows"] - done_before, (received, part["rows"], done_before)
        resumable += part["rows"] - done_before
    assert at_kill[held] is not None  # the partition the kill landed in had committed part of its range
    # Partitions the other worker ran were tried once.
    assert all(tis[i]["try_number"] == 1 for i in tis if i not in victims), tis
    # Rows the AI server sent twice: what the killed tries received but had not committed, never
    # more (the committed part was not asked for again).
    resent = _rows_sent(ai_log, ai_offset) - len(big_dataset)
    print(f"rows sent again after the kill: {resent} (at most {resumable})")
    assert 0 <= resent <= resumable
    assert_exact(dsn, big_dataset, watch)
