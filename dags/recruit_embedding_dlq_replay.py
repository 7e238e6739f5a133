"""``recruit_embedding_dlq_replay``: dead-lettered rows -> recruit_metadata / recruit_embedding.

Run it after fixing what made rows fail (a new ``RECRUIT_EMBEDDING_DIMENSION`` with the tables
migrated, a corrected row on the AI server, ...). Every pending ``recruit_embedding_dlq`` entry in
scope is re-validated and upserted; an entry whose row is stored becomes ``resolved``, one that
still fails stays ``pending`` with ``attempts`` counted up and the latest error, and one whose id
was written after it was dead-lettered becomes ``superseded`` (its stale payload is not written
over the newer row). Replaying again changes nothing. A replay that stored rows emits an event
of the embedding table's Asset (``announce_change``), as the ingest does.

Scope it with Params (combined with AND; none given = every pending entry), for example
``{"error_kinds": ["dimension_mismatch"]}`` or
``{"ids": ["019b..."], "refetch": true}`` to replay the AI server's corrected version of a row.
Manual by default; ``RECRUIT_DLQ_REPLAY_SCHEDULE`` (a cron or preset) schedules it.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_embedding_provider.operators.dlq_replay import DEFAULT_BATCH_SIZE, EmbeddingDlqReplayOperator
from airflow_embedding_provider.operators.embedding_asset import EmbeddingAssetEventOperator
from airflow_embedding_provider.rows import DEFAULT_DIMENSION

SCHEDULE = os.environ.get("RECRUIT_DLQ_REPLAY_SCHEDULE", "none")
DIMENSION = int(os.environ.get("RECRUIT_EMBEDDING_DIMENSION", DEFAULT_DIMENSION))
RETRIES = int(os.environ.get("RECRUIT_EMBEDDING_RETRIES", "2"))
RETRY_DELAY = float(os.environ.get("RECRUIT_EMBEDDING_RETRY_DELAY", "30"))

with DAG(
    dag_id="recruit_embedding_dlq_replay",
    schedule=None if SCHEDULE.lower() in ("", "none") else SCHEDULE,
    start_date=pendulum.datetime(2025, 12, 11, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["embedding", "pgvector", "dlq"],
    # Each batch of entries commits with its rows, so a retry replays only what is still pending.
    default_args={"retries": RETRIES, "retry_delay": timedelta(seconds=RETRY_DELAY), "retry_exponential_backoff": True},
    params={
        "ids": Param(
            [],
            type="array",
            items={"type": "string", "format": "uuid"},
            description="Replay only the entries of these row ids; empty = any.",
        ),
        "since": Param(
            None,
            type=["null", "string"],
            format="date-time",
            description="Only entries created at or after this date-time (ISO 8601; UTC without a zone).",
        ),
        "until": Param(
            None,
            type=["null", "string"],
            format="date-time",
            description="Only entries created before this date-time.",
        ),
        "error_kinds": Param(
            [],
            type="array",
            items={"type": "string"},
            description="Only entries with these error kinds, e.g. dimension_mismatch; empty = any.",
        ),
        "refetch": Param(
            False,
            type="boolean",
            description="Replay the AI server's current version of each row (the stored payload when it "
            "does not hold the id).",
        ),
        "batch_size": Param(
            DEFAULT_BATCH_SIZE, type="integer", minimum=1, maximum=10000, description="Entries a transaction."
        ),
    },
    doc_md=__doc__,
) as dag:
    replay = EmbeddingDlqReplayOperator(
        task_id="replay",
        postgres_conn_id="postgres_default",
        grpc_conn_id="embedding_grpc_default",
        dimension=DIMENSION,
        ids="{{ params.ids | tojson }}",
        since="{{ params.since or '' }}",
        until="{{ params.until or '' }}",
        error_kinds="{{ params.error_kinds | tojson }}",
        refetch="{{ params.refetch }}",
        batch_size="{{ params.batch_size }}",
    )
    replay >> EmbeddingAssetEventOperator(task_id="announce_change", source_task_id="replay")
