"""The provider's metrics, sent through Airflow's ``Stats`` (StatsD, Datadog or OpenTelemetry,
whichever ``[metrics]`` configures; nothing when metrics are off).

Names (after Airflow's ``[metrics] statsd_prefix``), tagged with ``dag_id`` and ``stream`` (the
cache metrics with ``dag_id`` and ``target``); with plain StatsD the tags travel in the name only
when ``statsd_influxdb_enabled`` is on:

=====================================  =======  =================================================
``embedding.rows_received``            counter  rows that arrived from the AI server
``embedding.rows_stored``              counter  rows stored (new, changed or unchanged)
``embedding.rows_dead_lettered``       counter  rows that went to the DLQ
``embedding.rows_deleted``             counter  rows deleted (when the ingest reports deletions)
``embedding.rows_per_second``          gauge    rows received a second over the whole run
``embedding.recall``                   gauge    recall of the ANN index, 0..1 (:func:`record_recall`)
``embedding.writers``                  gauge    writers one ingest task runs at once, its share of
                                                the writer budget; 0 when it leaves (also tagged
                                                ``map_index``; only with a budget)
``embedding.cache_invalidations.delivered``  counter  outbox entries delivered to the API server
``embedding.cache_invalidations.pending``    gauge    outbox entries still pending after a delivery
=====================================  =======  =================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

try:  # Airflow 3.2+: the Task SDK's Stats
    from airflow.sdk.observability.stats import Stats
except ImportError:  # pragma: no cover - Airflow 3.1
    from airflow.stats import Stats  # type: ignore[no-redef,attr-defined,unused-ignore]

PREFIX = "embedding"
ROWS_RECEIVED = f"{PREFIX}.rows_received"
ROWS_STORED = f"{PREFIX}.rows_stored"
ROWS_DEAD_LETTERED = f"{PREFIX}.rows_dead_lettered"
ROWS_DELETED = f"{PREFIX}.rows_deleted"
ROWS_PER_SECOND = f"{PREFIX}.rows_per_second"
RECALL = f"{PREFIX}.recall"
WRITERS = f"{PREFIX}.writers"
CACHE_DELIVERED = f"{PREFIX}.cache_invalidations.delivered"
CACHE_PENDING = f"{PREFIX}.cache_invalidations.pending"


def _tags(dag_id: str, **more: str) -> dict[str, str]:
    return {"dag_id": dag_id, **more}


def record_rows(result: Mapping[str, Any], *, dag_id: str, stream: str) -> None:
    """The row counters of one ingest task's result (its ``IngestStats.as_dict()``)."""
    tags = _tags(dag_id, stream=stream)
    Stats.incr(ROWS_RECEIVED, int(result.get("rows_received") or 0), tags=tags)
    Stats.incr(ROWS_STORED, int(result.get("rows_stored") or 0), tags=tags)
    Stats.incr(ROWS_DEAD_LETTERED, int(result.get("rows_dlq") or 0), tags=tags)
    if "deleted" in result:
        Stats.incr(ROWS_DELETED, int(result.get("deleted") or 0), tags=tags)


def record_rate(rows_per_second: float, *, dag_id: str, stream: str) -> None:
    """The run's rows a second (gauge)."""
    Stats.gauge(ROWS_PER_SECOND, float(rows_per_second), tags=_tags(dag_id, stream=stream))


def record_recall(recall: float, *, dag_id: str, stream: str) -> None:
    """The recall the ANN index reached on a measurement, between 0 and 1 (gauge)."""
    if not 0.0 <= recall <= 1.0:
        raise ValueError(f"recall must be between 0 and 1, got {recall}")
    Stats.gauge(RECALL, float(recall), tags=_tags(dag_id, stream=stream))


def record_writers(writers: int, *, dag_id: str, stream: str, map_index: int | None) -> None:
    """Writers an ingest task runs at once, on each change of its share (gauge;
    storage/writer_budget.py): summed over the tasks, the writers on the database now."""
    index = -1 if map_index is None else map_index  # Airflow's map_index of an unmapped task
    Stats.gauge(WRITERS, int(writers), tags=_tags(dag_id, stream=stream, map_index=str(index)))


def record_cache_delivery(delivered: int, pending: int, *, dag_id: str, target: str) -> None:
    """Outbox entries delivered by one invalidation (counter) and still pending after it (gauge)."""
    tags = _tags(dag_id, target=target)
    Stats.incr(CACHE_DELIVERED, int(delivered), tags=tags)
    Stats.gauge(CACHE_PENDING, int(pending), tags=tags)
