"""The shape of ``recruit_embedding_ingest`` with no work: the scheduler bench's fixed-cost baseline.

Five tasks as in the ingest DAG: a planner that plans no partitions, a task mapped over them (so
it is skipped, as in a run that finds nothing new), a finalizer that runs anyway, the cache task
after it, and the Asset task, which skips as ``announce_change`` does when no row changed (a
skipped task's state reaches Airflow only when its process has exited, so a run ending in a skip
can end later than one ending in a success). What a run of this DAG costs is what Airflow itself
charges for that shape.
"""

from __future__ import annotations

import os
from typing import Any

import pendulum
from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowSkipException

SCHEDULE = os.environ.get("BENCH_EMPTY_DAG_SCHEDULE", "none")


@dag(
    dag_id="bench_empty_ingest_shape",
    schedule=None if SCHEDULE.lower() in ("", "none") else SCHEDULE,
    start_date=pendulum.datetime(2025, 12, 11, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["bench"],
    default_args={"retries": 0},
)
def bench_empty_ingest_shape() -> None:
    @task
    def plan_partitions() -> list[dict[str, Any]]:
        return []

    @task
    def ingest(partition: dict[str, Any]) -> dict[str, Any]:
        return partition

    @task(trigger_rule="none_failed")
    def finalize() -> dict[str, int]:
        return {"rows_received": 0}

    @task
    def invalidate_cache() -> None:
        return None

    @task
    def announce_change() -> None:
        raise AirflowSkipException("no row changed")

    done = finalize()
    ingest.expand(partition=plan_partitions()) >> done >> invalidate_cache()
    done >> announce_change()


bench_empty_ingest_shape()
