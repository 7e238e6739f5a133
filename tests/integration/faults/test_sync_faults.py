"""A range sync that deletes, SIGKILLed for real under the scheduler, then retried by Airflow.

Deleting happens only in a range's final transaction, with the source's id list of the range as
evidence (storage/sync.py): a task killed before it never deletes a row the source has, and its
retry deletes what the source lacks. The run ends with the tables exactly the source.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.rows import RowBatch
from airflow_embedding_provider.storage.schema import apply_schema
from airflow_embedding_provider.storage.writer import ChunkWriter
from dev.embedded_postgres import EmbeddedPostgres
from dev.stack import ServerProcess
from tests.integration.faults.helpers import (
    CONF,
    assert_exact,
    cluster_env,
    kill_tasks_mid_run,
)

FOREIGN_ROWS = 1000


def _store(dsn: str, dataset: EmbeddingDataset, stop: int) -> list[str]:
    """The source's first ``stop`` rows, stored, and ``FOREIGN_ROWS`` rows the source does not have,
    with ids all over its id range; returns the foreign ids."""
    rng = np.random.default_rng(5)
    source = set(dataset.ids)
    candidates = {
        str(uuid.UUID(int=uuid.UUID(dataset.ids[k]).int + 1)) for k in rng.choice(len(dataset) - 1, 2 * FOREIGN_ROWS)
    }
    foreign = sorted(rng.choice(sorted(candidates - source), FOREIGN_ROWS, replace=False).tolist())
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_schema(conn, dataset.dimension)
        writer = ChunkWriter(conn, dimension=dataset.dimension)
        for begin in range(0, stop, 5000):
            end = min(begin + 5000, stop)
            writer.write(
                RowBatch(
                    ids=dataset.ids[begin:end],
                    company_name=dataset.company_name[begin:end],
                    exp_years=dataset.exp_years[begin:end],
                    english_level=dataset.english_level[begin:end],
                    primary_keyword=dataset.primary_keyword[begin:end],
                    vectors=dataset.vectors[begin:end],
                )
            )
        n = len(foreign)
        writer.write(
            RowBatch(
                ids=foreign,
                company_name=["Closed Upstream"] * n,
                exp_years=[1] * n,
                english_level=["basic"] * n,
                primary_keyword=["Go"] * n,
                vectors=rng.standard_normal((n, dataset.dimension)).astype(np.float32),
            )
        )
    return foreign


@pytest.mark.timeout(1200)
def test_a_deleting_range_sync_sigkilled_mid_run_is_retried_to_the_exact_source(
    postgres: EmbeddedPostgres,
    big_ai_server: ServerProcess,
    api_server: ServerProcess,
    big_dataset: EmbeddingDataset,
    tmp_path: Path,
) -> None:
    dsn = postgres.create_database("sync_kill")
    metadata_dsn = postgres.create_database("airflow_sync_kill_meta")
    half = len(big_dataset) // 2
    foreign = _store(dsn, big_dataset, half)
    assert len(foreign) == FOREIGN_ROWS
    env = cluster_env(tmp_path / "home", dsn, metadata_dsn, big_ai_server, api_server)

    def foreign_left() -> object:
        with psycopg.connect(dsn) as conn:
            left = conn.execute("SELECT count(*) FROM recruit_metadata WHERE id = ANY(%s::uuid[])", (foreign,))
            return left.fetchone()

    # Partition 1 streams the half not stored yet; kill its task once it committed some.
    result = kill_tasks_mid_run(
        env,
        dsn,
        tmp_path / "logs",
        conf=CONF | {"rows_per_partition": 50_000},
        ready=lambda progress: any(i == 1 and c is not None and not done for i, c, done in progress),
        at_kill=foreign_left,
    )
    at_kill, tries, summary, watch = result.at_kill, result.tries, result.summary, result.watch
    foreign_at_kill = result.noted
    print("sync kill:", at_kill, tries, foreign_at_kill, summary)
    assert any(i == 1 and c is not None and not done for i, c, done in at_kill), at_kill
    # Partition 1 had not deleted its share yet (ids all over the range: both partitions delete).
    in_partition_1 = sum(1 for f in foreign if f > big_dataset.ids[half - 1])
    assert 0 < in_partition_1 < FOREIGN_ROWS
    assert foreign_at_kill is not None and foreign_at_kill[0] >= in_partition_1
    assert max(tries.values()) >= 2, tries  # Airflow retried the killed try
    assert summary["deleted"] == FOREIGN_ROWS and summary["deletes_blocked"] == 0, summary
    # The retry resumed inside its range: it did not send again what the killed try committed.
    assert 0 < summary["rows_received"] < len(big_dataset) - half + FOREIGN_ROWS, summary
    assert_exact(dsn, big_dataset, watch)
