"""``airflow-embedding search`` on input it cannot use: one clear line on stderr, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
import pytest

from airflow_embedding_provider.storage.schema import apply_schema
from dev.sample import make_sample
from tests.integration.storage.test_search import load_frame

DIMENSION = 16


@pytest.fixture
def loaded(pg_dsn: str, tmp_path: Path) -> tuple[str, Path, str]:
    frame = make_sample(300, dimension=DIMENSION, seed=9, clusters=5, layout="seed")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, DIMENSION)
        load_frame(conn, frame)
    good = tmp_path / "q.npy"
    np.save(good, np.stack(list(frame["job_post_vectors"][:2])).astype(np.float32))
    return pg_dsn, good, str(frame["id"][0])


def search(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow_embedding_provider.cli", "search", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_search_prints_one_json_line_per_query(loaded: tuple[str, Path, str]) -> None:
    dsn, good, row_id = loaded
    done = search("--postgres-dsn", dsn, "--vector-file", str(good), "-k", "3", "--filter", "exp_years<=10")
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["query"], len(line["results"])) for line in lines] == [(0, 3), (1, 3)]
    like = search("--postgres-dsn", dsn, "--like", row_id, "-k", "1")
    assert like.returncode == 0, like.stderr
    assert json.loads(like.stdout)["results"][0]["id"] == row_id  # a row is its own nearest neighbour


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--filter", "salary<=3"], "unknown column 'salary'"),
        (["--filter", "exp_years>=3"], "exp_years takes <= or =, not '>='"),
        (["--filter", "english_level>=native"], "english_level is one of"),
        (["-k", "0"], "k must be between 1 and 1000"),
    ],
)
def test_bad_filters_and_k_exit_2_with_one_line(loaded: tuple[str, Path, str], args: list[str], message: str) -> None:
    dsn, good, _ = loaded
    done = search("--postgres-dsn", dsn, "--vector-file", str(good), *args)
    _assert_one_clear_line(done, message)


def test_bad_queries_exit_2_with_one_line(loaded: tuple[str, Path, str], tmp_path: Path) -> None:
    dsn, _, _ = loaded
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros(DIMENSION + 1, dtype=np.float32))
    _assert_one_clear_line(
        search("--postgres-dsn", dsn, "--vector-file", str(wrong)),
        f"query dimension {DIMENSION + 1} does not match the table's vector({DIMENSION})",
    )
    cube = tmp_path / "cube.npy"
    np.save(cube, np.zeros((2, 2, DIMENSION), dtype=np.float32))
    _assert_one_clear_line(
        search("--postgres-dsn", dsn, "--vector-file", str(cube)), "must have shape (dim,) or (q, dim)"
    )
    junk = tmp_path / "junk.npy"
    junk.write_text("not numpy")
    _assert_one_clear_line(search("--postgres-dsn", dsn, "--vector-file", str(junk)), "not a readable .npy array")
    _assert_one_clear_line(search("--postgres-dsn", dsn, "--like", "not-a-uuid"), "is not a UUID")
    _assert_one_clear_line(
        search("--postgres-dsn", dsn, "--like", "00000000-0000-7000-8000-000000000000"), "no stored row has id"
    )


def _assert_one_clear_line(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("airflow-embedding search: error: ") and message in lines[0], lines[0]
    assert done.stdout == ""
