"""``recruit_embedding_ingest`` run for real: ``airflow dags test``, real PostgreSQL and AI server."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.operators.embedding_stream import EmbeddingStreamPlanOperator
from airflow_embedding_provider.partitions import DEFAULT_ROWS_PER_PARTITION
from airflow_embedding_provider.storage.writer_budget import WriterBudget
from dev.api_server.service import read_stats
from dev.stack import DAGS_FOLDER, ServerProcess, dags_test, task_result
from dev.verify import compare, table_digest

DAG_ID = "recruit_embedding_ingest"


def _checkpoint(dsn: str) -> str | None:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('embedding_batch_checkpoint')").fetchone() == (None,):
            return None
        row = conn.execute(
            "SELECT last_processed_uuid::text FROM embedding_batch_checkpoint WHERE stream_name = 'recruit'"
        ).fetchone()
    return None if row is None else row[0]


def _ann_indexes(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT indexname FROM pg_indexes WHERE indexname IN ('recruit_embedding_ivfflat', "
            "'recruit_embedding_hnsw') ORDER BY 1"
        ).fetchall()
    return [r[0] for r in rows]


def _invalidations(api_server: ServerProcess) -> int:
    stats_file = api_server.command[api_server.command.index("--stats-file") + 1]
    return read_stats(Path(stats_file)).invalidations.get("recruit", 0)


def test_scheduled_run_stores_the_pkl_exactly_then_resumes(
    dag_env: dict[str, str],
    airflow_home: Path,
    pg_dsn: str,
    sample_dataset: EmbeddingDataset,
    api_server: ServerProcess,
) -> None:
    calls_before = _invalidations(api_server)
    dags_test(DAG_ID, dag_env, conf={"rows_per_partition": 1000})
    # The run changed rows: exactly one invalidation reached the API server.
    assert _invalidations(api_server) == calls_before + 1
    assert task_result(airflow_home, DAG_ID, "invalidate_cache")["status"] == "delivered"
    result = task_result(airflow_home, DAG_ID, "finalize")
    assert result["rows_received"] == result["inserted"] == len(sample_dataset)
    assert result["partitions"] == 3 and result["rows_dlq"] == 0
    assert task_result(airflow_home, DAG_ID, "plan_partitions", key="start_after") is None
    assert result["last_processed_uuid"] == sample_dataset.ids[-1]
    assert task_result(airflow_home, DAG_ID, "finalize", key="checkpoint") == sample_dataset.ids[-1]
    assert _checkpoint(pg_dsn) == sample_dataset.ids[-1]
    with psycopg.connect(pg_dsn) as conn:
        check = compare(conn, sample_dataset)
        assert check.equal, check.summary()
        before = table_digest(conn)
    assert result["ann_index_built"] == "ivfflat"
    assert _ann_indexes(pg_dsn) == ["recruit_embedding_ivfflat"]

    # A second run compares every range's digest with the stored rows: nothing differs, nothing is
    # streamed or rewritten. The deployment now asks for an HNSW index: that one is built and the
    # ivfflat one dropped.
    hnsw_env = {**dag_env, "RECRUIT_EMBEDDING_ANN_INDEX": "HNSW "}
    dags_test(DAG_ID, hnsw_env)
    again = task_result(airflow_home, DAG_ID, "finalize")
    assert task_result(airflow_home, DAG_ID, "plan_partitions", key="start_after") is None
    assert again["rows_received"] == 0 and again["partitions"] == 0
    assert again["ann_index_built"] == "hnsw"
    assert _ann_indexes(pg_dsn) == ["recruit_embedding_hnsw"]

    # A triggered run re-sends what follows the given id; the upserts change nothing.
    middle = sample_dataset.ids[1999]
    dags_test(DAG_ID, hnsw_env, conf={"last_processed_uuid": middle.upper()})
    triggered = task_result(airflow_home, DAG_ID, "finalize")
    assert triggered["ann_index_built"] is None  # the HNSW index stays; nothing flips back
    assert _ann_indexes(pg_dsn) == ["recruit_embedding_hnsw"]
    assert task_result(airflow_home, DAG_ID, "plan_partitions", key="start_after") == middle
    assert triggered["rows_received"] == triggered["unchanged"] == len(sample_dataset) - 2000
    # Neither the empty run nor the run that changed nothing asked for an invalidation.
    assert _invalidations(api_server) == calls_before + 1
    assert _checkpoint(pg_dsn) == sample_dataset.ids[-1]
    with psycopg.connect(pg_dsn) as conn:
        assert table_digest(conn) == before


def test_chunk_size_param_reaches_the_stream(dag_env: dict[str, str], airflow_home: Path, pg_dsn: str) -> None:
    # Not the default (1000 at 384-d, which would also give 3 chunks): 500 a message gives 6.
    dags_test(DAG_ID, dag_env, conf={"chunk_size": 500})
    assert task_result(airflow_home, DAG_ID, "finalize")["chunks"] == 6


def test_the_partition_size_has_one_default_for_the_form_and_the_operator() -> None:
    # One definition (partitions.py, which says why): what the form offers is what the operator does untold.
    dag = runpy.run_path(str(DAGS_FOLDER / f"{DAG_ID}.py"))["dag"]
    assert dag.params["rows_per_partition"] == DEFAULT_ROWS_PER_PARTITION
    assert EmbeddingStreamPlanOperator(task_id="plan").rows_per_partition == DEFAULT_ROWS_PER_PARTITION


def test_a_chunk_size_no_message_can_hold_is_refused_by_the_form(dag_env: dict[str, str], pg_dsn: str) -> None:
    # At 384-d a message holds 1224 rows (wire/contract.py); the Param's maximum says so at trigger.
    result = dags_test(DAG_ID, dag_env, conf={"chunk_size": 1225}, check=False)
    assert result.returncode != 0
    assert "1225 is greater than the maximum of 1224" in result.stdout + result.stderr
    assert _checkpoint(pg_dsn) is None


def test_a_param_that_is_not_a_uuid_is_refused(dag_env: dict[str, str], pg_dsn: str) -> None:
    result = dags_test(DAG_ID, dag_env, conf={"last_processed_uuid": "yesterday"}, check=False)
    assert result.returncode != 0
    assert "is not a 'uuid'" in result.stdout + result.stderr
    assert _checkpoint(pg_dsn) is None


def test_ai_server_down_fails_the_run_with_a_clear_message(dag_env: dict[str, str], pg_dsn: str) -> None:
    env = dict(dag_env)
    env["AIRFLOW_CONN_EMBEDDING_GRPC_DEFAULT"] = json.dumps(
        {"conn_type": "embedding_grpc", "host": "127.0.0.1", "port": 9, "extra": {"timeout": 2}}
    )
    result = dags_test(DAG_ID, env, check=False)
    assert result.returncode != 0
    assert "no gRPC server answered at 127.0.0.1:9 within 2 s" in result.stdout + result.stderr


def test_a_table_of_another_dimension_stops_the_run(dag_env: dict[str, str], pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        conn.execute("CREATE TABLE recruit_metadata (id uuid PRIMARY KEY)")
        conn.execute(
            "CREATE TABLE recruit_embedding (id uuid PRIMARY KEY REFERENCES recruit_metadata(id), vector vector(768))"
        )
    result = dags_test(DAG_ID, dag_env, check=False)
    assert result.returncode != 0
    assert "stores vector(768) but the configured dimension is 384" in result.stdout + result.stderr
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM recruit_embedding").fetchone() == (0,)


@pytest.mark.parametrize("command", [["providers", "list"], ["providers", "hooks"]])
def test_airflow_lists_the_provider(dag_env: dict[str, str], command: list[str]) -> None:
    from dev.stack import airflow

    out = airflow(command, dag_env).stdout
    assert "airflow-embedding-provider" in out
    if command[1] == "hooks":
        assert "embedding_grpc" in out and "GrpcEmbeddingHook" in out


def test_an_unknown_ann_index_setting_stops_the_dag_file_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECRUIT_EMBEDDING_ANN_INDEX", "diskann")
    with pytest.raises(ValueError, match="RECRUIT_EMBEDDING_ANN_INDEX must be one of ivfflat, hnsw, got 'diskann'"):
        runpy.run_path(str(DAGS_FOLDER / f"{DAG_ID}.py"))


def test_each_ingest_task_writes_on_its_share_of_the_databases_writer_budget(
    dag_env: dict[str, str], airflow_home: Path, pg_dsn: str, sample_dataset: EmbeddingDataset
) -> None:
    # Another ingest task of this database holds its place (a real registration, on its own
    # session) while the DAG runs: each of the DAG's tasks gets half of a budget of 2 writers.
    env = {**dag_env, "RECRUIT_EMBEDDING_DB_WRITER_BUDGET": "2", "RECRUIT_EMBEDDING_DB_CONNECTIONS": "4"}
    with psycopg.connect(pg_dsn, autocommit=True) as neighbour, WriterBudget(neighbour, budget=2, writers=4):
        result = dags_test(DAG_ID, env, conf={"rows_per_partition": 1000})
    out = result.stdout + result.stderr
    assert out.count("writing on 1 of 4 connection(s) at once: a budget of 2 writer(s) over 2 ingest task(s)") == 3
    assert task_result(airflow_home, DAG_ID, "finalize")["inserted"] == len(sample_dataset)
    with psycopg.connect(pg_dsn) as conn:
        check = compare(conn, sample_dataset)
        assert check.equal, check.summary()
