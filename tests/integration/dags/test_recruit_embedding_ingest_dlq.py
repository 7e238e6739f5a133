"""Bad rows through the real ingest DAG: every source row ends in the tables or in the DLQ with
the right reason, nothing else; the DLQ budget fails a run that rejects too much."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset, load_dataset
from airflow_embedding_provider.storage.schema import apply_schema
from dev.sample import make_sample, uuid7_strings
from dev.stack import ServerProcess, airflow_env, dags_test, task_result
from dev.verify import compare, table_digest
from tests.conftest import start_ai_server

DAG_ID = "recruit_embedding_ingest"
DIM = 384


def _bad_rows(rng: np.random.Generator) -> list[tuple[dict[str, Any], str | None]]:
    """(row, expected DLQ kind or None when the row is good after coercion)."""
    fresh = iter(uuid7_strings(40, rng, start_ms=1_900_000_000_000))

    def row(**changes: Any) -> dict[str, Any]:
        base = {
            "id": next(fresh),
            "Company Name": "Bad Row Ltd",
            "Exp Years": 2,
            "English Level": "upper",
            "Primary Keyword": "Python",
            "job_post_vectors": rng.standard_normal(DIM).astype(np.float32),
        }
        return base | changes

    nan, inf = float("nan"), float("inf")

    def vec(value: float, at: int = 5) -> np.ndarray:
        v = np.ones(DIM, dtype=np.float32)
        v[at] = value
        return v

    return [
        (row(id=None), "missing_id"),
        (row(id=""), "missing_id"),
        (row(id="row-17"), "invalid_id"),
        (row(id="00000000-0000-0000-0000-00000000000g"), "invalid_id"),
        (row(job_post_vectors=[]), "missing_vector"),
        (row(job_post_vectors=None), "missing_vector"),
        (row(job_post_vectors=np.ones(DIM - 1, dtype=np.float32)), "dimension_mismatch"),
        (row(job_post_vectors=np.ones(DIM + 1, dtype=np.float32)), "dimension_mismatch"),
        (row(job_post_vectors=vec(nan)), "non_finite_vector"),
        (row(job_post_vectors=vec(inf)), "non_finite_vector"),
        (row(job_post_vectors=vec(-inf, at=0)), "non_finite_vector"),
        (row(**{"Company Name": "Null\x00Byte GmbH"}), "nul_byte"),
        (row(**{"English Level": "upper\x00"}), "nul_byte"),
        (row(**{"Primary Keyword": "x" * 20_000}), "text_too_long"),
        (row(**{"Company Name": "y" * 10_001}), "text_too_long"),
        (row(**{"Exp Years": -3}), "exp_years_out_of_range"),
        (row(**{"Primary Keyword": "COBOL"}), "database_rejected"),  # refused by a CHECK the test adds
        (row(**{"Exp Years": "5 years"}), None),  # coerced to 5
        (row(**{"Exp Years": "7y", "Company Name": None}), None),  # coerced to 7, null name kept
    ]


@pytest.fixture(scope="module")
def dirty() -> tuple[pd.DataFrame, list[tuple[dict[str, Any], str | None]]]:
    rng = np.random.default_rng(99)
    good = make_sample(3000, seed=31)
    bad = _bad_rows(rng)
    repeat = good.iloc[[10]].assign(**{"Primary Keyword": "Rust"})  # same id again: the later one wins
    frame = pd.concat(
        [good.astype({"Exp Years": object}), pd.DataFrame([r for r, _ in bad]), repeat], ignore_index=True
    )
    return frame, bad


@pytest.fixture
def dirty_env(
    dirty: tuple[pd.DataFrame, list[Any]], tmp_path: Path, airflow_home: Path, pg_dsn: str, api_server: ServerProcess
) -> Iterator[tuple[dict[str, str], EmbeddingDataset]]:
    pkl = tmp_path / "dirty.pkl"
    dirty[0].to_pickle(pkl)
    dataset = load_dataset(pkl)
    server, target = start_ai_server(dataset)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, DIM)
        conn.execute("ALTER TABLE recruit_metadata ADD CONSTRAINT no_cobol CHECK (primary_keyword <> 'COBOL')")
    env = airflow_env(
        airflow_home,
        postgres_dsn=pg_dsn,
        embedding_target=target,
        cache_target=api_server.target,
        extra={"RECRUIT_EMBEDDING_RETRIES": "0"},
    )
    yield env, dataset
    server.stop(0)  # type: ignore[attr-defined]


def _dlq(dsn: str) -> list[tuple[str | None, str, str, dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id::text, error_kind, error_message, payload FROM recruit_embedding_dlq").fetchall()


def test_every_bad_row_lands_in_the_dlq_with_its_reason_and_every_good_row_in_the_tables(
    dirty_env: tuple[dict[str, str], EmbeddingDataset],
    dirty: tuple[pd.DataFrame, list[tuple[dict[str, Any], str | None]]],
    airflow_home: Path,
    pg_dsn: str,
) -> None:
    env, dataset = dirty_env
    frame, bad = dirty
    dags_test(DAG_ID, env, conf={"rows_per_partition": 1000})
    expected = Counter(kind for _, kind in bad if kind)
    assert len(expected) >= 9 and sum(expected.values()) == 17  # 17 bad rows of 9 reasons

    rows = _dlq(pg_dsn)
    assert Counter(kind for _, kind, _, _ in rows) == expected
    by_payload_id = {(payload["id"], kind) for _, kind, _, payload in rows}
    for source, kind in bad:
        if kind is not None:
            assert (source["id"] or "", kind) in by_payload_id, (source["id"], kind)
    messages = {kind: message for _, kind, message, _ in rows}
    assert messages["dimension_mismatch"] in (
        "vector has 383 dimensions, expected 384",
        "vector has 385 dimensions, expected 384",
    )
    assert "SQLSTATE 23514" in messages["database_rejected"] and "no_cobol" in messages["database_rejected"]

    summary = task_result(airflow_home, DAG_ID, "finalize")
    assert summary["rows_dlq"] == 17 and summary["dlq_by_reason"] == dict(expected)

    rejected_ids = {source["id"] for source, kind in bad if kind and source["id"]}
    with psycopg.connect(pg_dsn) as conn:
        check = compare(conn, dataset, ignore=rejected_ids)
        assert check.equal, check.summary()
        stored = conn.execute("SELECT count(*) FROM recruit_metadata").fetchone()[0]  # type: ignore[index]
        coerced = conn.execute(
            "SELECT exp_years FROM recruit_metadata WHERE company_name IS NULL AND exp_years = 7"
        ).fetchall()
        rust = conn.execute(
            "SELECT primary_keyword FROM recruit_metadata WHERE id = %s", (frame.loc[10, "id"],)
        ).fetchone()
        before = table_digest(conn)
    assert coerced == [(7,)] and rust == ("Rust",)
    # Every source row is in exactly one place: the repeated id counts once.
    assert stored + len(rows) == frame["id"].astype(str).nunique() + 1  # None and "" are distinct rows

    # Loading everything again changes nothing: no new DLQ entry, the same tables.
    dags_test(DAG_ID, env, conf={"full_refresh": True})
    assert len(_dlq(pg_dsn)) == 17
    with psycopg.connect(pg_dsn) as conn:
        assert table_digest(conn) == before


def test_a_run_over_the_dlq_budget_fails_after_storing_everything(
    dirty_env: tuple[dict[str, str], EmbeddingDataset], pg_dsn: str
) -> None:
    env, dataset = dirty_env
    result = dags_test(DAG_ID, env, conf={"max_dlq_fraction": 0.001}, check=False)
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "17 of 3020 rows (0.6%) went to the DLQ, above the allowed 0.1%" in out
    assert "Top reasons: non_finite_vector 3" in out
    assert len(_dlq(pg_dsn)) == 17
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM recruit_embedding").fetchone() == (len(dataset) - 17 - 1,)
