"""``recruit_embedding_ingest`` under a real Airflow: scheduler, dag-processor and api-server.

Unlike ``airflow dags test``, this goes the way a deployment does: the dag-processor parses the
DAG into a PostgreSQL metadata database, the scheduler queues task instances for LocalExecutor,
supervised workers fetch them through the API server's execution API, and the schedule makes runs
by itself. The AI server first offers 2000 rows: a run triggered through the REST API with
``{"last_processed_uuid": ids[999]}`` must store exactly ids[1000:2000]. Then the AI server gets
1000 newer rows and the DAG a one-minute schedule: the scheduled run must resume after the
checkpoint and store exactly ids[2000:3000], nothing before ids[1000].
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pandas as pd
import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset, load_dataset
from airflow_embedding_provider.ai_server.service import build_server
from dev.airflow_cluster import AirflowCluster
from dev.api_server.service import read_stats
from dev.embedded_postgres import EmbeddedPostgres
from dev.stack import ServerProcess, airflow_env, free_port
from dev.verify import compare

pytestmark = [pytest.mark.dag, pytest.mark.timeout(1200)]

DAG_ID = "recruit_embedding_ingest"
FIRST = 2000  # rows the AI server offers before the scheduled run
RESUME_AFTER = 999  # index of the id the triggered run resumes after


class SwappableAIServer:
    """An in-process AI server on a fixed port whose rows can be replaced (stop, serve anew)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: grpc.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def serve(self, dataset: EmbeddingDataset) -> None:
        self.stop()
        self.server, _ = build_server(dataset, host="127.0.0.1", port=self.port)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None


@pytest.fixture
def ai_rows(tmp_path: Path, sample_frame: pd.DataFrame, sample_dataset: EmbeddingDataset) -> Iterator[tuple]:
    """The AI server, serving the first ``FIRST`` rows (in id order) of the sample."""
    first_ids = set(sample_dataset.ids[:FIRST])
    path = tmp_path / "first.pkl"
    sample_frame[sample_frame["id"].isin(first_ids)].to_pickle(path)
    server = SwappableAIServer()
    server.serve(load_dataset(path))
    yield server, sample_dataset
    server.stop()


def _stored_ids(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute("SELECT id::text FROM recruit_metadata ORDER BY id")]


def _checkpoint(dsn: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT last_processed_uuid::text FROM embedding_batch_checkpoint WHERE stream_name = 'recruit'"
        ).fetchone()
    return None if row is None else row[0]


def _exactly(dsn: str, dataset: EmbeddingDataset, expected: list[str]) -> None:
    """The tables hold exactly ``expected`` of ``dataset``, every field and vector bit-exact."""
    assert _stored_ids(dsn) == expected
    keep = set(expected)
    with psycopg.connect(dsn) as conn:
        check = compare(conn, dataset, ignore=[i for i in dataset.ids if i not in keep])
    assert check.equal, check.summary()


def _invalidations(api_server: ServerProcess) -> int:
    stats_file = api_server.command[api_server.command.index("--stats-file") + 1]
    return read_stats(Path(stats_file)).invalidations.get("recruit", 0)


def test_scheduler_runs_the_triggered_and_the_scheduled_ingest(
    tmp_path: Path,
    postgres: EmbeddedPostgres,
    pg_dsn: str,
    ai_rows: tuple[SwappableAIServer, EmbeddingDataset],
    api_server: ServerProcess,
) -> None:
    ai, dataset = ai_rows
    assert dataset.invalid_prefix == 0 and not dataset.odd_vectors  # every row is storable
    ids = dataset.ids
    # LocalExecutor runs tasks in parallel: the metadata database must be PostgreSQL, not SQLite.
    metadata_dsn = postgres.create_database("airflow_scheduler_meta").replace("postgresql://", "postgresql+psycopg://")
    env = airflow_env(
        tmp_path / "airflow-home",
        postgres_dsn=pg_dsn,
        embedding_target=ai.target,
        cache_target=api_server.target,
        extra={
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_dsn,
            "RECRUIT_EMBEDDING_RETRIES": "0",  # a failure shows at once instead of after backoff
        },
    )
    cluster = AirflowCluster(env, log_dir=tmp_path / "logs")
    started = time.monotonic()
    try:
        cluster.migrate()
        cluster.start()
        assert cluster.wait_for_dag(DAG_ID)["is_paused"]  # new DAGs wait to be switched on
        cluster.set_paused(DAG_ID, False)
        invalidations = _invalidations(api_server)

        # Triggered with a UUID: exactly the rows after it, in two mapped tasks run in parallel.
        run_id = cluster.trigger(DAG_ID, {"last_processed_uuid": ids[RESUME_AFTER], "rows_per_partition": 500})
        run = cluster.wait_for_run(DAG_ID, run_id=run_id)
        states = cluster.task_states(run)
        assert sorted(states) == [
            "announce_change",
            "finalize",
            "ingest[0]",
            "ingest[1]",
            "invalidate_cache",
            "plan_partitions",
        ]
        assert set(states.values()) == {"success"}
        # Each wrote on its share of the database's writer budget (the DAG's default, 4 writers),
        # as its own log says: the setting reaches tasks the scheduler runs side by side.
        ingests = [ti for ti in cluster.task_instances(run) if ti["task_id"] == "ingest"]
        for ti in ingests:
            events = [str(line.get("event", "")) for line in cluster.task_log(ti)]
            assert any("connection(s) at once: a budget of 4 writer(s) over" in e for e in events), events[-20:]
        _exactly(pg_dsn, dataset, ids[RESUME_AFTER + 1 : FIRST])
        assert _checkpoint(pg_dsn) == ids[FIRST - 1]
        assert _invalidations(api_server) == invalidations + 1

        # New rows reach the AI server and the DAG gets a schedule: the scheduler starts a run by
        # itself, which compares every range with the source (README "Range sync"): the rows
        # after the checkpoint arrive, and so do those at or below RESUME_AFTER that the triggered
        # run left out.
        ai.serve(dataset)
        cluster.restart("dag-processor", {"RECRUIT_EMBEDDING_SCHEDULE": "* * * * *"})
        scheduled = cluster.wait_for_run(DAG_ID, run_type="scheduled")
        _exactly(pg_dsn, dataset, ids)
        assert _checkpoint(pg_dsn) == ids[-1]
        assert _invalidations(api_server) == invalidations + 2
        assert cluster.task_states(scheduled)["ingest[0]"] == "success"
    except BaseException:
        print(cluster.log_tails())
        raise
    finally:
        cluster.stop()
        print(f"real scheduler test: {time.monotonic() - started:.0f} s")
