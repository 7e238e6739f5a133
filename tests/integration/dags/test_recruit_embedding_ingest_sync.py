"""Range sync through the real ingest DAG: the tables follow the source both ways, for any id order.

Each test changes the source between runs by serving another file from another AI server, as a
deployment does when a new ``.pkl`` arrives.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import psycopg

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset, load_dataset
from dev.api_server.service import read_stats
from dev.sample import make_sample
from dev.stack import ServerProcess, airflow_env, dags_test, task_result
from dev.verify import compare
from tests.conftest import start_ai_server

DAG_ID = "recruit_embedding_ingest"


def _invalidations(api_server: ServerProcess) -> int:
    stats_file = api_server.command[api_server.command.index("--stats-file") + 1]
    return read_stats(Path(stats_file)).invalidations.get("recruit", 0)


@contextmanager
def _source(frame: pd.DataFrame, folder: Path, name: str) -> Iterator[tuple[str, EmbeddingDataset]]:
    """An AI server over ``frame``; yields its target and the dataset it serves."""
    pkl = folder / f"{name}.pkl"
    frame.to_pickle(pkl)
    dataset = load_dataset(pkl)
    server, target = start_ai_server(dataset)
    try:
        yield target, dataset
    finally:
        server.stop(0)  # type: ignore[attr-defined]


def _env(airflow_home: Path, dsn: str, target: str, api_server: ServerProcess) -> dict[str, str]:
    return airflow_env(
        airflow_home,
        postgres_dsn=dsn,
        embedding_target=target,
        cache_target=api_server.target,
        extra={"RECRUIT_EMBEDDING_RETRIES": "0"},
    )


def _assert_exact(dsn: str, dataset: EmbeddingDataset) -> None:
    with psycopg.connect(dsn) as conn:
        check = compare(conn, dataset)
        assert check.equal, check.summary()
        orphans = conn.execute(
            "SELECT count(*) FROM recruit_metadata m LEFT JOIN recruit_embedding e USING (id) WHERE e.id IS NULL"
        ).fetchone()
    assert orphans == (0,), "metadata rows without their embedding"


def _between(ids: list[str], taken: set[str], count: int, rng: np.random.Generator) -> list[str]:
    """``count`` new ids, each just above an existing id, so that they fall all over the id range."""
    out: list[str] = []
    for k in rng.choice(len(ids) - 1, size=count * 2, replace=False):
        candidate = str(uuid.UUID(int=uuid.UUID(ids[k]).int + 1))
        if candidate not in taken and len(out) < count:
            out.append(candidate)
            taken.add(candidate)
    assert len(out) == count
    return out


def test_the_source_loses_gains_and_changes_rows_and_the_next_run_follows_it_exactly(
    airflow_home: Path, pg_dsn: str, api_server: ServerProcess, tmp_path: Path
) -> None:
    rng = np.random.default_rng(13)
    first = make_sample(20_000, seed=41)
    with _source(first, tmp_path, "first") as (target, dataset):
        dags_test(DAG_ID, _env(airflow_home, pg_dsn, target, api_server), conf={"rows_per_partition": 5000})
    _assert_exact(pg_dsn, dataset)

    # 500 rows gone from all over the id range, 100 new ones among them, 100 changed.
    by_id = first.sort_values("id").reset_index(drop=True)
    ids = by_id["id"].tolist()
    gone = set(ids[::40][:500])
    assert len(gone) == 500 and min(gone) == ids[0] and max(gone) > ids[-400]
    kept = by_id[~by_id["id"].isin(gone)].reset_index(drop=True)
    changed = rng.choice(len(kept), size=100, replace=False)
    kept.loc[changed[:50], "Company Name"] = "Changed Upstream Ltd"
    vectors = [np.array(v, dtype=np.float32) for v in kept["job_post_vectors"]]
    for i in changed[50:]:
        vectors[i][7] = np.nextafter(vectors[i][7], np.float32(2))  # one bit of one value
    kept["job_post_vectors"] = pd.Series(vectors, index=kept.index)
    new = make_sample(100, seed=42).assign(id=_between(ids, set(ids), 100, rng))
    second = pd.concat([kept, new], ignore_index=True).sample(frac=1.0, random_state=3)

    calls = _invalidations(api_server)
    with _source(second, tmp_path, "second") as (target, dataset):
        env = _env(airflow_home, pg_dsn, target, api_server)
        dags_test(DAG_ID, env, conf={"rows_per_partition": 5000})
        summary = task_result(airflow_home, DAG_ID, "finalize")
        _assert_exact(pg_dsn, dataset)
        assert _invalidations(api_server) == calls + 1  # once for the whole run
        assert (summary["deleted"], summary["inserted"], summary["updated"]) == (500, 100, 100), summary
        # Only the rows that differ crossed the wire: the 100 new and the 100 changed.
        assert summary["rows_received"] == 200 and summary["deletes_blocked"] == 0, summary

        # Nothing changed since: no range differs, nothing is streamed, nothing invalidated.
        dags_test(DAG_ID, env, conf={"rows_per_partition": 5000})
        again = task_result(airflow_home, DAG_ID, "finalize")
        assert again["partitions"] == 0 and again["rows_received"] == 0 and again["deleted"] == 0, again
        assert _invalidations(api_server) == calls + 1
    _assert_exact(pg_dsn, dataset)


def _uuid4_sample(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return make_sample(rows, seed=seed).assign(id=[str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(rows)])


def test_rows_with_uuid4_ids_below_the_checkpoint_are_stored_by_the_next_scheduled_run(
    airflow_home: Path, pg_dsn: str, api_server: ServerProcess, tmp_path: Path
) -> None:
    first = _uuid4_sample(3000, seed=51)
    with _source(first, tmp_path, "first") as (target, dataset):
        dags_test(DAG_ID, _env(airflow_home, pg_dsn, target, api_server), conf={"rows_per_partition": 1000})
    _assert_exact(pg_dsn, dataset)
    checkpoint = task_result(airflow_home, DAG_ID, "finalize", key="checkpoint")
    assert checkpoint == dataset.ids[-1]

    added = _uuid4_sample(1003, seed=52)
    below = int((added["id"] < checkpoint).sum())
    assert below > 900  # random ids: nearly all sort below the highest id stored
    with _source(pd.concat([first, added], ignore_index=True), tmp_path, "second") as (target, dataset):
        dags_test(DAG_ID, _env(airflow_home, pg_dsn, target, api_server))  # no full_refresh
        summary = task_result(airflow_home, DAG_ID, "finalize")
    assert summary["inserted"] == summary["rows_received"] == 1003, summary
    _assert_exact(pg_dsn, dataset)


def test_a_source_that_shrinks_to_200_rows_deletes_nothing_unless_the_param_allows_it(
    airflow_home: Path, pg_dsn: str, api_server: ServerProcess, tmp_path: Path
) -> None:
    first = make_sample(3000, seed=61)
    with _source(first, tmp_path, "first") as (target, _):
        dags_test(DAG_ID, _env(airflow_home, pg_dsn, target, api_server), conf={"rows_per_partition": 1000})

    # A truncated file: 200 rows left, 20 of them changed upstream.
    small = first.iloc[:200].copy()
    small.loc[small.index[:20], "Primary Keyword"] = "Changed"
    with _source(small, tmp_path, "small") as (target, dataset):
        env = _env(airflow_home, pg_dsn, target, api_server)
        result = dags_test(DAG_ID, env, conf={"rows_per_partition": 1000}, check=False)
        assert result.returncode != 0
        out = result.stdout + result.stderr
        assert "the source no longer has 2800 of the 3000 stored rows (93.3%), above max_delete_fraction 0.2" in out
        assert "nothing was deleted, everything else is stored" in out
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT count(*) FROM recruit_metadata").fetchone() == (3000,)
            assert conn.execute("SELECT count(*) FROM recruit_embedding").fetchone() == (3000,)
            changed = conn.execute("SELECT count(*) FROM recruit_metadata WHERE primary_keyword = 'Changed'")
            assert changed.fetchone() == (20,)  # the 200 are stored as the source has them

        dags_test(DAG_ID, env, conf={"rows_per_partition": 1000, "max_delete_fraction": 1.0})
        summary = task_result(airflow_home, DAG_ID, "finalize")
    assert summary["deleted"] == 2800 and summary["deletes_blocked"] == 0, summary
    _assert_exact(pg_dsn, dataset)
