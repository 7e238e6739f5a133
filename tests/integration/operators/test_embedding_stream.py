"""The ingest operators' own failure paths, against a real PostgreSQL."""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import psycopg
import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_embedding_provider.operators.embedding_stream import (
    EmbeddingFinalizeOperator,
    EmbeddingStreamToPgvectorOperator,
    _build_ann_index,
)
from airflow_embedding_provider.storage.recall import recall_sample, tune_search
from airflow_embedding_provider.storage.schema import apply_schema
from airflow_embedding_provider.storage.search import SEARCH_SETTINGS, read_search_setting
from airflow_embedding_provider.wire.contract import max_chunk_size
from dev.sample import make_sample
from dev.stack import airflow_env, dags_test, task_result
from tests.integration.storage.test_search import load_frame

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


def test_a_negative_writer_budget_fails_the_task_without_retries() -> None:
    operator = EmbeddingStreamToPgvectorOperator(task_id="ingest", db_writer_budget=-2)
    with pytest.raises(
        AirflowFailException, match=re.escape("db_writer_budget must be at least 1 writer (or 0 for none), got -2")
    ):
        operator.execute(cast("Context", {"ti": None}))


def test_a_chunk_size_no_message_can_hold_fails_the_task_without_retries() -> None:
    # The DAG's Param allows 2500 rows; at 384-d a message holds 1224 (wire/contract.py). The AI
    # server would refuse the stream on every try, as a gRPC traceback.
    operator = EmbeddingStreamToPgvectorOperator(task_id="ingest", chunk_size=1225, dimension=384)
    with pytest.raises(AirflowFailException, match="chunk_size 1225 is above 1224, the most rows of dimension 384"):
        operator.execute(cast("Context", {"ti": None}))
    assert max_chunk_size(384) == 1224


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


@pytest.fixture
def loaded(pg_dsn: str) -> Iterator[tuple[psycopg.Connection, psycopg.Connection]]:
    """Two connections to a database of 3,000 clustered rows of 16-d, with no ANN index yet."""
    frame = make_sample(3000, dimension=16, seed=4, clusters=30, layout="seed")
    with psycopg.connect(pg_dsn, autocommit=True) as conn, psycopg.connect(pg_dsn, autocommit=True) as side:
        apply_schema(conn, 16)
        load_frame(conn, frame)
        yield conn, side


def test_finalize_takes_the_recall_sample_while_the_index_builds(
    loaded: tuple[psycopg.Connection, psycopg.Connection],
) -> None:
    conn, side = loaded
    operator = EmbeddingFinalizeOperator(task_id="finalize", recall_queries=20)
    built, sample = operator._build_index_and_sample(conn, side)
    assert built == "ivfflat" and sample is not None
    # The same queries and answers as a gate that takes its sample after the build.
    after = recall_sample(conn, queries=20)
    assert after is not None and sample.truth == after.truth and sample.rows_indexed == 3000
    assert all(np.array_equal(a, b) for a, b in zip(sample.queries, after.queries, strict=True))
    chosen, again = tune_search(conn, queries=20, sample=sample), tune_search(conn, queries=20)
    assert chosen is not None and again is not None
    assert (chosen.value, chosen.tried, chosen.recall_lower_bound) == (
        again.value,
        again.tried,
        again.recall_lower_bound,
    )
    # The gate after the build asks its queries over the side connection too, with the same choice.
    gated = operator._recall_gate(conn, True, sample, side=side)
    assert gated is not None and gated["measured"]
    assert (gated["value"], gated["tried"]) == (chosen.value, {str(k): v for k, v in chosen.tried.items()})
    # Index there: nothing built, no sample (the gate takes its own when rows changed).
    assert operator._build_index_and_sample(conn, side) == (None, None)


def test_a_failed_build_fails_finalize_with_its_own_error(
    loaded: tuple[psycopg.Connection, psycopg.Connection],
) -> None:
    conn, side = loaded
    # An open writing transaction holds the lock CREATE INDEX waits for; the build gives up at
    # lock_timeout while the sample's read runs beside it.
    with psycopg.connect(conn.info.dsn) as writer:
        writer.execute(
            "UPDATE recruit_embedding SET updated_at = now() WHERE id = (SELECT id FROM recruit_embedding LIMIT 1)"
        )
        conn.execute("SET lock_timeout = '300ms'")
        operator = EmbeddingFinalizeOperator(task_id="finalize", recall_queries=20)
        with pytest.raises(psycopg.errors.LockNotAvailable):
            operator._build_index_and_sample(conn, side)
        writer.rollback()
    assert conn.execute("SELECT count(*) FROM pg_indexes WHERE indexname LIKE '%ivfflat'").fetchone() == (0,)
    assert side.execute("SELECT 1").fetchone() == (1,)  # the side connection is free for the next try


# A user's DAG with the recall gate off: finalize alone, after a load done outside Airflow.
GATE_OFF_DAG = """
import pendulum
from airflow.sdk import DAG, Param
from airflow_embedding_provider.operators.embedding_stream import EmbeddingFinalizeOperator

with DAG(
    dag_id="finalize_gate_off",
    schedule=None,
    start_date=pendulum.datetime(2025, 12, 11, tz="UTC"),
    params={"min_recall": Param(None, type=["null", "string"])},
):
    EmbeddingFinalizeOperator(task_id="finalize", min_recall=MIN_RECALL)
"""


@pytest.mark.parametrize(
    ("min_recall", "conf"),
    [("None", None), ('"{{ params.min_recall }}"', None), ('"{{ params.min_recall }}"', {"min_recall": ""})],
    ids=["none", "rendered-none", "rendered-empty"],
)
def test_finalize_with_the_gate_off_builds_the_index_and_measures_nothing(
    airflow_home: Path, pg_dsn: str, tmp_path: Path, min_recall: str, conf: dict[str, str] | None
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, 16)
        load_frame(conn, make_sample(3000, dimension=16, seed=4, clusters=30, layout="seed"))
    folder = tmp_path / "gate_off"
    folder.mkdir()
    (folder / "finalize_gate_off.py").write_text(GATE_OFF_DAG.replace("MIN_RECALL", min_recall), encoding="utf-8")
    env = airflow_env(airflow_home, postgres_dsn=pg_dsn, embedding_target="127.0.0.1:1")
    dags_test("finalize_gate_off", {**env, "AIRFLOW__CORE__DAGS_FOLDER": str(folder)}, conf=conf)
    result = task_result(airflow_home, "finalize_gate_off", "finalize")
    assert result["ann_index_built"] == "ivfflat" and result["recall"] is None
    assert task_result(airflow_home, "finalize_gate_off", "finalize", key="recall") is None
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT indexname FROM pg_indexes WHERE indexname LIKE '%ivfflat' OR indexname LIKE '%hnsw'"
        ).fetchall() == [("recruit_embedding_ivfflat",)]
        # No setting measured or stored: searches use pgvector's default, and so does other SQL.
        assert conn.execute("SELECT count(*) FROM embedding_search_settings").fetchone() == (0,)
        setting = read_search_setting(conn)
        assert setting is not None and not setting.tuned and setting.value == SEARCH_SETTINGS["ivfflat"][1]
        assert conn.execute(
            "SELECT count(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase "
            "WHERE d.datname = current_database()"
        ).fetchone() == (0,)
