"""``recruit_embedding_consumer``: an example downstream DAG, run when the embeddings changed.

Scheduled on the embedding table's Asset (``RECRUIT_EMBEDDING_ASSET_URI``), so it runs after an
ingest or a DLQ replay that changed rows, never after one that found nothing new. Its task reads
the triggering events' extra: how many rows changed and the checkpoint reached. Replace the task
with the work that needs fresh embeddings (e.g. rebuilding recommendations).
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context, task

from airflow_embedding_provider.assets import embedding_table_asset

EMBEDDINGS = embedding_table_asset()


@dag(
    dag_id="recruit_embedding_consumer",
    schedule=[EMBEDDINGS],
    start_date=pendulum.datetime(2025, 12, 11, tz="UTC"),
    catchup=False,
    tags=["embedding", "example"],
    doc_md=__doc__,
)
def recruit_embedding_consumer() -> None:
    @task
    def read_change() -> dict[str, Any]:
        """The change this run answers: the rows changed by all triggering events, the newest checkpoint."""
        events = list(get_current_context()["triggering_asset_events"][EMBEDDINGS])
        extras = [dict(e.extra or {}) for e in events]
        change = {
            "events": len(events),
            "rows_changed": sum(int(x.get("rows_changed") or 0) for x in extras),
            "checkpoint": next((x["checkpoint"] for x in reversed(extras) if x.get("checkpoint")), None),
            "extras": extras,
        }
        print(f"embeddings changed: {change}")
        return change

    read_change()


recruit_embedding_consumer()
