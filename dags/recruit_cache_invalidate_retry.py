"""``recruit_cache_invalidate_retry``: deliver the cache invalidations that are still pending.

An ingest run whose invalidation failed past its retries leaves its outbox entries pending
(docs/design.md §11: the run ends, a retry scheduler delivers them separately). This DAG finds every target with
pending entries and delivers each through the same single-flight path as the ingest's
``CacheInvalidateOperator``; a target someone else delivered meanwhile makes no call, so runs are
idempotent. A run that still cannot deliver fails (the entries stay pending for the next run), so
that a stale API cache shows as a failed run.

Scheduled by ``RECRUIT_CACHE_RETRY_SCHEDULE`` (default every 5 minutes; ``none`` turns it off).
"""

from __future__ import annotations

import contextlib
import os

import pendulum
from airflow.sdk import DAG, task

from airflow_embedding_provider.hooks.postgres import psycopg3_connection
from airflow_embedding_provider.operators.cache_invalidate import RETRY_DAG_ID, CacheInvalidateOperator
from airflow_embedding_provider.storage.outbox import pending_targets

SCHEDULE = os.environ.get("RECRUIT_CACHE_RETRY_SCHEDULE", "*/5 * * * *")
POSTGRES_CONN_ID = "postgres_default"

with DAG(
    dag_id=RETRY_DAG_ID,
    schedule=None if SCHEDULE.lower() in ("", "none") else SCHEDULE,
    start_date=pendulum.datetime(2025, 12, 11, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["embedding", "cache"],
    doc_md=__doc__,
) as dag:

    @task
    def find_pending_targets() -> list[str]:
        conn = psycopg3_connection(POSTGRES_CONN_ID)
        with contextlib.closing(conn):
            return pending_targets(conn)

    # One mapped task a target; none when nothing is pending, and then the run makes no call.
    CacheInvalidateOperator.partial(
        task_id="deliver",
        grpc_conn_id="cache_grpc_default",
        postgres_conn_id=POSTGRES_CONN_ID,
        fail_on_pending=True,
    ).expand(target=find_pending_targets())
