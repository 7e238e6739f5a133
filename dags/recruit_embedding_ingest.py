"""``recruit_embedding_ingest``: AI server -> recruit_metadata / recruit_embedding (pgvector).

Runs on a schedule (``RECRUIT_EMBEDDING_SCHEDULE``, default hourly; ``none`` turns it off) and
resumes after the stored checkpoint; trigger it with ``{"last_processed_uuid": "<uuid>"}`` to
resume after a given id instead.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_embedding_provider.operators.embedding_stream import EmbeddingStreamToPgvectorOperator
from airflow_embedding_provider.rows import DEFAULT_DIMENSION

SCHEDULE = os.environ.get("RECRUIT_EMBEDDING_SCHEDULE", "@hourly")
DIMENSION = int(os.environ.get("RECRUIT_EMBEDDING_DIMENSION", DEFAULT_DIMENSION))
RETRIES = int(os.environ.get("RECRUIT_EMBEDDING_RETRIES", "2"))

with DAG(
    dag_id="recruit_embedding_ingest",
    schedule=None if SCHEDULE.lower() in ("", "none") else SCHEDULE,
    start_date=pendulum.datetime(2025, 12, 11, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["embedding", "pgvector"],
    # A retry resumes after the stored checkpoint, so it re-sends only what was not committed.
    default_args={"retries": RETRIES, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True},
    params={
        "last_processed_uuid": Param(
            None,
            type=["null", "string"],
            format="uuid",
            description="Resume strictly after this id; empty = the stored checkpoint.",
        ),
        "chunk_size": Param(300, type="integer", minimum=1, maximum=2500, description="Rows a gRPC message."),
    },
    doc_md=__doc__,
) as dag:
    ingest = EmbeddingStreamToPgvectorOperator(
        task_id="ingest",
        grpc_conn_id="embedding_grpc_default",
        postgres_conn_id="postgres_default",
        last_processed_uuid="{{ params.last_processed_uuid or '' }}",
        chunk_size="{{ params.chunk_size }}",
        dimension=DIMENSION,
    )
