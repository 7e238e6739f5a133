"""The ingest operators' own failure paths, against a real PostgreSQL."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, cast

import psycopg
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_embedding_provider.operators.embedding_stream import (
    EmbeddingFinalizeOperator,
    EmbeddingStreamToPgvectorOperator,
    _build_ann_index,
)
from airflow_embedding_provider.storage.schema import apply_schema

if TYPE_CHECKING:
    from airflow.sdk import Context


def test_an_unknown_ann_index_method_fails_the_task_without_retries(pg_dsn: str) -> None:
    # Our DAG refuses such a value when it loads; a DAG of the user's own passes it to the operator.
    operator = EmbeddingFinalizeOperator(task_id="finalize", ann_index_method="diskann")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, 8)
        with pytest.raises(AirflowFailException, match="must be one of ivfflat, hnsw, got 'diskann'"):
            _build_ann_index(operator, conn, operator.ann_index_method)
        assert conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE indexname LIKE '%ivfflat' OR indexname LIKE '%hnsw'"
        ).fetchone() == (0,)


@pytest.mark.parametrize("sub_batch_size", [0, -5])
def test_a_sub_batch_size_below_one_fails_the_task_without_retries(sub_batch_size: int) -> None:
    # 0 rows a transaction used to loop for ever; a negative one raised deep inside the writer.
    operator = EmbeddingStreamToPgvectorOperator(task_id="ingest", sub_batch_size=sub_batch_size)
    with pytest.raises(AirflowFailException, match=f"sub_batch_size must be at least 1 row, got {sub_batch_size}"):
        operator.execute(cast("Context", {"ti": None}))


def test_the_former_name_still_works_and_warns() -> None:
    from airflow_embedding_provider.operators.embedding_stream import EmbeddingCheckpointOperator

    with pytest.warns(
        DeprecationWarning, match="EmbeddingCheckpointOperator is deprecated.*use EmbeddingFinalizeOperator"
    ):
        old = EmbeddingCheckpointOperator(task_id="finalize", max_dlq_fraction="0.1", ann_index_method="hnsw")
    assert isinstance(old, EmbeddingFinalizeOperator)
    new = EmbeddingFinalizeOperator(task_id="finalize", max_dlq_fraction="0.1", ann_index_method="hnsw")
    fields = (
        "postgres_conn_id",
        "ingest_task_id",
        "max_dlq_fraction",
        "stream_name",
        "build_ann_index",
        "ann_index_method",
    )
    assert [getattr(old, f) for f in fields] == [getattr(new, f) for f in fields]
    assert old.template_fields == new.template_fields


def test_the_new_name_does_not_warn() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EmbeddingFinalizeOperator(task_id="finalize")
    assert not [w for w in caught if "EmbeddingCheckpointOperator" in str(w.message)]
