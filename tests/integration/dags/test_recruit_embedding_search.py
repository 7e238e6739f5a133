"""A real ``recruit_embedding_ingest`` run on clustered vectors, then ``airflow-embedding search``.

The vectors sit in neighbourhoods, as text embeddings do; 60 rows of the same distribution are
held out of the load and used as fresh queries. The CLI's answers (through the ivfflat index with
the probes finalize's recall gate chose) are compared with numpy's exact top-10.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import load_dataset
from dev.sample import make_sample
from dev.stack import ServerProcess, airflow_env, dags_test, task_result
from tests.conftest import start_ai_server

DAG_ID = "recruit_embedding_ingest"
ROWS = 20_000
QUERIES = 60
K = 10


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, pd.DataFrame, Path]:
    frame = make_sample(ROWS + QUERIES, seed=23, clusters=ROWS // 100)
    loaded, held_out = frame.iloc[:ROWS].reset_index(drop=True), frame.iloc[ROWS:].reset_index(drop=True)
    path = tmp_path_factory.mktemp("clustered") / "clustered.pkl"
    loaded.to_pickle(path)
    return loaded, held_out, path


@pytest.fixture
def clustered_ai_server(clustered: tuple[pd.DataFrame, pd.DataFrame, Path]) -> Iterator[str]:
    server, target = start_ai_server(load_dataset(clustered[2]))
    yield target
    server.stop(0)  # type: ignore[attr-defined]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow_embedding_provider.cli", "search", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _exact_top(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> list[list[str]]:
    distances = ((queries[:, None, :] - vectors[None, :, :]) ** 2).sum(axis=2)
    return [list(ids[np.argsort(row, kind="stable")[:k]]) for row in distances]


def test_a_dag_run_tunes_the_index_and_search_finds_the_exact_neighbours(
    airflow_home: Path,
    pg_dsn: str,
    clustered: tuple[pd.DataFrame, pd.DataFrame, Path],
    clustered_ai_server: str,
    api_server: ServerProcess,
    tmp_path: Path,
) -> None:
    loaded, held_out, _ = clustered
    env = airflow_env(
        airflow_home,
        postgres_dsn=pg_dsn,
        embedding_target=clustered_ai_server,
        cache_target=api_server.target,
        extra={"RECRUIT_EMBEDDING_RETRIES": "0"},
    )
    dags_test(DAG_ID, env, conf={"rows_per_partition": 10_000})
    result = task_result(airflow_home, DAG_ID, "finalize")
    assert result["rows_stored"] == ROWS and result["ann_index_built"] == "ivfflat"
    recall = result["recall"]
    assert recall["measured"] and recall["reached"], recall
    assert recall["setting"] == "ivfflat.probes" and recall["recall_at_10"] >= 0.95
    assert recall["latency_ms_p95"] >= recall["latency_ms_p50"] > 0
    assert task_result(airflow_home, DAG_ID, "finalize", key="recall")["value"] == recall["value"]
    with psycopg.connect(pg_dsn) as conn:
        stored = conn.execute("SELECT method, value FROM embedding_search_settings").fetchall()
        # ALTER DATABASE ... SET: a new session of a user's own SQL searches with the same probes.
        assert conn.execute("SHOW ivfflat.probes").fetchone() == (str(recall["value"]),)
    assert stored == [("ivfflat", recall["value"])]

    vectors = np.stack(list(loaded["job_post_vectors"])).astype(np.float32)
    ids = loaded["id"].to_numpy()
    queries = np.stack(list(held_out["job_post_vectors"])).astype(np.float32)
    query_file = tmp_path / "queries.npy"
    np.save(query_file, queries)

    done = _cli("--postgres-dsn", pg_dsn, "--vector-file", str(query_file), "-k", str(K))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["query"] for line in lines] == list(range(QUERIES))
    truth = _exact_top(vectors, ids, queries, K)
    found = [[hit["id"] for hit in line["results"]] for line in lines]
    assert all(len(f) == K for f in found)
    cli_recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)])
    assert cli_recall >= 0.95, f"recall@10 {cli_recall:.3f} through the CLI"
    first = lines[0]["results"][0]
    assert set(first) >= {"id", "distance", "company_name", "exp_years", "english_level", "primary_keyword"}

    keyword = "Python"
    done = _cli(
        "--postgres-dsn",
        pg_dsn,
        "--vector-file",
        str(query_file),
        "-k",
        str(K),
        "--filter",
        f"primary_keyword={keyword}",
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(lines) == QUERIES
    assert all(len(line["results"]) == K for line in lines)
    assert all(hit["primary_keyword"] == keyword for line in lines for hit in line["results"])
    mask = (loaded["Primary Keyword"] == keyword).to_numpy()
    truth = _exact_top(vectors[mask], ids[mask], queries, K)
    found = [[hit["id"] for hit in line["results"]] for line in lines]
    filtered_recall = np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth, strict=True)])
    assert filtered_recall >= 0.95, f"recall@10 {filtered_recall:.3f} with primary_keyword={keyword}"
