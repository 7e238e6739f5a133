"""``recruit_embedding_ingest``: AI server -> recruit_metadata / recruit_embedding (pgvector).

``plan_partitions`` asks the AI server to split the rows after the checkpoint into id ranges;
``ingest`` is mapped over them (one task per range, in parallel on Celery/Kubernetes workers);
``finalize`` settles the checkpoint (the low watermark over the ranges), builds the ANN index
after a first load and enforces the DLQ budget; ``invalidate_cache`` tells the API server to drop
its ``recruit`` cache when the run changed rows; ``announce_change`` emits an event of the
embedding table's Asset for downstream DAGs (``recruit_embedding_consumer``) when it changed rows.

Runs on a schedule (``RECRUIT_EMBEDDING_SCHEDULE``, default hourly; ``none`` turns it off). Each
run compares the source and the tables range by range (digests) and syncs the ranges that differ,
whatever the id order: new and changed rows are stored, rows the source lost are deleted, unless
that is more than ``max_delete_fraction`` of the stored rows (then none are, and the run fails).
Trigger it with ``{"last_processed_uuid": "<uuid>"}`` to re-send every row after a given id, or
``{"full_refresh": true}`` to compare every range row by row.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_embedding_provider.operators.cache_invalidate import CacheInvalidateOperator
from airflow_embedding_provider.operators.embedding_asset import EmbeddingAssetEventOperator
from airflow_embedding_provider.operators.embedding_stream import (
    DEFAULT_MAX_DLQ_FRACTION,
    MAX_MAP_LENGTH,
    EmbeddingFinalizeOperator,
    EmbeddingStreamPlanOperator,
    EmbeddingStreamToPgvectorOperator,
)
from airflow_embedding_provider.partitions import DEFAULT_MAX_PARTITIONS, DEFAULT_ROWS_PER_PARTITION
from airflow_embedding_provider.pipeline import DEFAULT_DB_CONNECTIONS, DEFAULT_SUB_BATCH_SIZE, default_chunk_size
from airflow_embedding_provider.rows import DEFAULT_DIMENSION
from airflow_embedding_provider.storage.recall import DEFAULT_MIN_RECALL
from airflow_embedding_provider.storage.schema import ANN_METHODS, DEFAULT_ANN_METHOD, DEFAULT_MAX_BUILD_MEMORY
from airflow_embedding_provider.storage.sync import DEFAULT_MAX_DELETE_FRACTION
from airflow_embedding_provider.wire.contract import max_chunk_size

SCHEDULE = os.environ.get("RECRUIT_EMBEDDING_SCHEDULE", "@hourly")
DIMENSION = int(os.environ.get("RECRUIT_EMBEDDING_DIMENSION", DEFAULT_DIMENSION))
RETRIES = int(os.environ.get("RECRUIT_EMBEDDING_RETRIES", "2"))
RETRY_DELAY = float(os.environ.get("RECRUIT_EMBEDDING_RETRY_DELAY", "30"))
DB_CONNECTIONS = int(os.environ.get("RECRUIT_EMBEDDING_DB_CONNECTIONS", str(DEFAULT_DB_CONNECTIONS)))
# The most writers of all ingest tasks on the database at once, shared among the tasks running
# (storage/writer_budget.py); by default one task's writers; 0 = no budget. README, "Sizing".
DB_WRITER_BUDGET = int(os.environ.get("RECRUIT_EMBEDDING_DB_WRITER_BUDGET", str(DB_CONNECTIONS)))
# A task that runs longer fails (and retries) instead of holding its slot for ever; 0 = no limit.
# Generous by default: finalize's HNSW build at 1M rows takes many minutes.
TASK_TIMEOUT = float(os.environ.get("RECRUIT_EMBEDDING_TASK_TIMEOUT", "7200"))
# A deployment setting, not a per-run Param: the index outlives the run, and a Param's default
# in the next scheduled run would switch it straight back.
ANN_INDEX = os.environ.get("RECRUIT_EMBEDDING_ANN_INDEX", DEFAULT_ANN_METHOD).strip().lower()
if ANN_INDEX not in ANN_METHODS:
    raise ValueError(f"RECRUIT_EMBEDDING_ANN_INDEX must be one of {', '.join(ANN_METHODS)}, got {ANN_INDEX!r}")
# The most maintenance_work_mem the index build sets for its own transaction (a PostgreSQL size).
MAX_BUILD_MEMORY = os.environ.get("RECRUIT_EMBEDDING_MAX_BUILD_MEMORY", DEFAULT_MAX_BUILD_MEMORY)

with DAG(
    dag_id="recruit_embedding_ingest",
    schedule=None if SCHEDULE.lower() in ("", "none") else SCHEDULE,
    start_date=pendulum.datetime(2025, 12, 11, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["embedding", "pgvector"],
    # A retry resumes after what its earlier try committed, so it re-sends only the rest.
    default_args={
        "retries": RETRIES,
        "retry_delay": timedelta(seconds=RETRY_DELAY),
        "retry_exponential_backoff": True,
        "execution_timeout": timedelta(seconds=TASK_TIMEOUT) if TASK_TIMEOUT > 0 else None,
    },
    params={
        "last_processed_uuid": Param(
            None,
            type=["null", "string"],
            format="uuid",
            description="Resume strictly after this id; empty = after the stored checkpoint.",
        ),
        "full_refresh": Param(
            False, type="boolean", description="Compare every range row by row, whatever its digest says."
        ),
        "chunk_size": Param(
            default_chunk_size(DIMENSION),
            type="integer",
            minimum=1,
            maximum=max_chunk_size(DIMENSION),  # more would not fit a message (wire/contract.py)
            description="Rows a gRPC message.",
        ),
        "sub_batch_size": Param(
            DEFAULT_SUB_BATCH_SIZE, type="integer", minimum=1, maximum=10000, description="Rows a DB transaction."
        ),
        "rows_per_partition": Param(
            DEFAULT_ROWS_PER_PARTITION,
            type="integer",
            minimum=100,
            description="Aim of rows a mapped task (fewer, larger tasks: higher).",
        ),
        "max_partitions": Param(
            DEFAULT_MAX_PARTITIONS,
            type="integer",
            minimum=1,
            maximum=MAX_MAP_LENGTH,
            description="Cap on mapped tasks.",
        ),
        "max_dlq_fraction": Param(
            DEFAULT_MAX_DLQ_FRACTION,
            type="number",
            minimum=0,
            maximum=1,
            description="Fail the run above this share of DLQ rows.",
        ),
        "min_recall": Param(
            DEFAULT_MIN_RECALL,
            type="number",
            minimum=0,
            maximum=1,
            description="Recall@10 the tuned ANN search must reach after a change (finalize fails below it).",
        ),
        "max_delete_fraction": Param(
            DEFAULT_MAX_DELETE_FRACTION,
            type="number",
            minimum=0,
            maximum=1,
            description="Delete rows the source lost only up to this share of the stored rows; above it, "
            "delete none and fail the run.",
        ),
    },
    doc_md=__doc__,
) as dag:
    plan = EmbeddingStreamPlanOperator(
        task_id="plan_partitions",
        last_processed_uuid="{{ params.last_processed_uuid or '' }}",
        full_refresh="{{ params.full_refresh }}",
        rows_per_partition="{{ params.rows_per_partition }}",
        max_partitions="{{ params.max_partitions }}",
        max_delete_fraction="{{ params.max_delete_fraction }}",
        dimension=DIMENSION,
    )
    ingest = EmbeddingStreamToPgvectorOperator.partial(
        task_id="ingest",
        chunk_size="{{ params.chunk_size }}",
        sub_batch_size="{{ params.sub_batch_size }}",
        db_connections=DB_CONNECTIONS,
        db_writer_budget=DB_WRITER_BUDGET,
        dimension=DIMENSION,
        map_index_template="{{ partition_label }}",
    ).expand(partition=plan.output)
    finalize = EmbeddingFinalizeOperator(
        task_id="finalize",
        max_dlq_fraction="{{ params.max_dlq_fraction }}",
        max_delete_fraction="{{ params.max_delete_fraction }}",
        ann_index_method=ANN_INDEX,
        max_build_memory=MAX_BUILD_MEMORY,
        min_recall="{{ params.min_recall }}",
        trigger_rule="none_failed",  # also after a run with nothing new (no mapped task)
    )
    # After every partition succeeded: drop the API server's cache once, through the outbox the
    # chunks wrote to (no call when nothing changed). Down past its retries, the entry stays
    # pending for recruit_cache_invalidate_retry and this run still succeeds.
    invalidate = CacheInvalidateOperator(
        task_id="invalidate_cache",
        postgres_conn_id="postgres_default",
        grpc_conn_id="cache_grpc_default",
    )
    # Beside the invalidation, not after it: a pending invalidation must not hold back the event.
    # No rows changed: this task skips, so no event and no consumer run.
    announce = EmbeddingAssetEventOperator(task_id="announce_change", source_task_id="finalize")
    plan >> ingest >> finalize >> invalidate
    finalize >> announce
