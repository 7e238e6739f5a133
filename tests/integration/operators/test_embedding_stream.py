"""The ingest operators' own failure paths, against a real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_embedding_provider.operators.embedding_stream import EmbeddingCheckpointOperator, _build_ann_index
from airflow_embedding_provider.storage.schema import apply_schema


def test_an_unknown_ann_index_method_fails_the_task_without_retries(pg_dsn: str) -> None:
    # Our DAG refuses such a value when it loads; a DAG of the user's own passes it to the operator.
    operator = EmbeddingCheckpointOperator(task_id="finalize", ann_index_method="diskann")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, 8)
        with pytest.raises(AirflowFailException, match="must be one of ivfflat, hnsw, got 'diskann'"):
            _build_ann_index(operator, conn, operator.ann_index_method)
        assert conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE indexname LIKE '%ivfflat' OR indexname LIKE '%hnsw'"
        ).fetchone() == (0,)
