"""``push --sync``: the tables end equal to the pushed file, with the same deletion guard as the DAG."""

from __future__ import annotations

from pathlib import Path

import psycopg

from airflow_embedding_provider.ai_server.dataset import load_dataset
from dev.sample import make_sample
from dev.verify import compare
from tests.integration.upload_server.conftest import StartServer, count_rows
from tests.integration.upload_server.test_upload_server import push


def test_push_sync_deletes_what_the_file_lacks_within_the_guard(
    upload_server: StartServer, pg_dsn: str, tmp_path: Path
) -> None:
    frame = make_sample(2000, seed=71)
    full, smaller, tiny = tmp_path / "full.pkl", tmp_path / "smaller.pkl", tmp_path / "tiny.pkl"
    frame.to_pickle(full)
    gone = frame.sort_values("id")["id"].iloc[::20]  # 100 ids from all over the range
    kept = frame[~frame["id"].isin(gone)]
    kept.to_pickle(smaller)
    kept.iloc[:50].to_pickle(tiny)
    server = upload_server()
    assert push(full, server.target).returncode == 0

    # Without --sync an upload only adds and updates.
    assert push(smaller, server.target).returncode == 0
    assert count_rows(pg_dsn) == 2000

    result = push(smaller, server.target, "--sync")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sync: deleted 100 rows the upload did not have" in result.stdout
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        check = compare(conn, load_dataset(smaller))
        assert check.equal, check.summary()
    assert count_rows(pg_dsn, "recruit_embedding") == 1900

    # A truncated file: nothing is deleted, the run fails naming the guard; raised, it deletes.
    result = push(tiny, server.target, "--sync")
    assert result.returncode == 1
    assert (
        "sync: the upload lacks 1850 of the 1900 stored rows (97.4%), above max_delete_fraction 0.2: "
        "nothing was deleted, everything else is stored" in result.stderr
    ), result.stderr[-2000:]
    assert count_rows(pg_dsn) == 1900
    result = push(tiny, server.target, "--sync", "--max-delete-fraction", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        check = compare(conn, load_dataset(tiny))
        assert check.equal, check.summary()


def test_push_sync_with_after_is_refused_with_one_line(tmp_path: Path) -> None:
    pkl = tmp_path / "a.pkl"
    make_sample(10, seed=1).to_pickle(pkl)
    result = push(pkl, "127.0.0.1:1", "--sync", "--after", "019b0ab5-2505-70b1-a1e9-c32b7590e4ea")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "airflow-embedding push: error: --sync needs the whole file: it cannot be combined with --after"
    )
