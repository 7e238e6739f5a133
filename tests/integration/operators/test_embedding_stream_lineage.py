"""OpenLineage of the ingest operator, with the OpenLineage provider installed and without it."""

from __future__ import annotations

import json
import sys

import psycopg
import pytest

from airflow_embedding_provider.operators.dlq_replay import EmbeddingDlqReplayOperator
from airflow_embedding_provider.operators.embedding_stream import EmbeddingStreamToPgvectorOperator
from airflow_embedding_provider.storage.schema import apply_schema


@pytest.fixture
def operator(monkeypatch: pytest.MonkeyPatch, pg_dsn: str) -> EmbeddingStreamToPgvectorOperator:
    monkeypatch.setenv("AIRFLOW_CONN_LINEAGE_PG", pg_dsn)
    monkeypatch.setenv(
        "AIRFLOW_CONN_LINEAGE_AI",
        json.dumps({"conn_type": "embedding_grpc", "host": "ai.example", "port": 50061}),
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, 8)
    op = EmbeddingStreamToPgvectorOperator(
        task_id="ingest", grpc_conn_id="lineage_ai", postgres_conn_id="lineage_pg", dimension=8
    )
    op._lineage_counts = {"metadata": 120, "embedding": 120, "dlq": 3}  # what execute() records
    return op


def test_lineage_names_the_stream_in_and_the_tables_out(
    operator: EmbeddingStreamToPgvectorOperator, pg_dsn: str
) -> None:
    lineage = operator.get_openlineage_facets_on_complete(None)  # type: ignore[arg-type]
    (source,) = lineage.inputs
    assert (source.namespace, source.name) == ("grpc://ai.example:50061", "recruit")
    host_port = pg_dsn.split("@")[1].split("/")[0]
    database = pg_dsn.rsplit("/", 1)[1]
    outputs = {o.name: o for o in lineage.outputs}
    assert set(outputs) == {
        f"{database}.public.{t}" for t in ("recruit_metadata", "recruit_embedding", "recruit_embedding_dlq")
    }
    assert {o.namespace for o in lineage.outputs} == {f"postgres://{host_port}"}
    embedding = outputs[f"{database}.public.recruit_embedding"]
    assert [(f.name, f.type) for f in embedding.facets["schema"].fields][:2] == [
        ("id", "uuid"),
        ("vector", "vector(8)"),
    ]
    dlq = outputs[f"{database}.public.recruit_embedding_dlq"]
    assert "error_message" in {f.name for f in dlq.facets["schema"].fields}
    counts = {name: o.outputFacets["outputStatistics"].rowCount for name, o in outputs.items()}
    assert sorted(counts.values()) == [3, 120, 120]


def test_without_the_openlineage_provider_there_is_no_lineage_and_no_error(
    operator: EmbeddingStreamToPgvectorOperator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if the provider were not installed: importing it raises ImportError.
    for name in [m for m in sys.modules if m.startswith("airflow.providers.openlineage")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "airflow.providers.openlineage", None)
    # Nothing is asked of the connections either: this one does not exist.
    operator.postgres_conn_id = "no_such_connection"
    assert operator.get_openlineage_facets_on_complete(None) is None  # type: ignore[arg-type]


def test_replay_lineage_reads_the_dlq_and_writes_the_tables(
    operator: EmbeddingStreamToPgvectorOperator, pg_dsn: str
) -> None:
    replay = EmbeddingDlqReplayOperator(
        task_id="replay", grpc_conn_id="lineage_ai", postgres_conn_id="lineage_pg", dimension=8
    )
    replay._lineage_counts = {"metadata": 4, "embedding": 4, "dlq": 5}  # what execute() records
    database = pg_dsn.rsplit("/", 1)[1]
    lineage = replay.get_openlineage_facets_on_complete(None)  # type: ignore[arg-type]
    assert [i.name for i in lineage.inputs] == [f"{database}.public.recruit_embedding_dlq"]  # no refetch: no AI server
    counts = {o.name.rsplit(".", 1)[1]: o.outputFacets["outputStatistics"].rowCount for o in lineage.outputs}
    assert counts == {"recruit_metadata": 4, "recruit_embedding": 4, "recruit_embedding_dlq": 5}
    replay._refetched = True
    lineage = replay.get_openlineage_facets_on_complete(None)  # type: ignore[arg-type]
    assert lineage.inputs[0].namespace == "grpc://ai.example:50061"
