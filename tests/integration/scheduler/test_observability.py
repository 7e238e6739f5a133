"""What Airflow 3 users watch, under a real Airflow (scheduler, dag-processor, api-server):
the embedding table's Asset, OpenLineage events and StatsD metrics of ``recruit_embedding_ingest``.

``airflow dags test`` records Asset events but creates no downstream run (that is the
scheduler's job) and initialises no metrics backend (the task runner's ``main`` does), so this
uses the real deployment of ``dev.airflow_cluster`` once for all three: a first run stores the
AI server's 3000 rows, a second run finds nothing new. In between the StatsD packets (a UDP
listener on 127.0.0.1 is the StatsD server) and the OpenLineage events (the provider's file
transport) are those of the first run alone.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.metrics import (
    CACHE_DELIVERED,
    CACHE_PENDING,
    RECALL,
    ROWS_DEAD_LETTERED,
    ROWS_DELETED,
    ROWS_PER_SECOND,
    ROWS_RECEIVED,
    ROWS_STORED,
    WRITERS,
)
from dev.airflow_cluster import AirflowCluster
from dev.embedded_postgres import EmbeddedPostgres
from dev.stack import ServerProcess, airflow_env
from tests.conftest import start_ai_server

pytestmark = [pytest.mark.dag, pytest.mark.timeout(1500)]

INGEST, CONSUMER = "recruit_embedding_ingest", "recruit_embedding_consumer"
STATSD_PREFIX = "airflow"


class StatsdListener:
    """A StatsD server for the test: every UDP datagram to 127.0.0.1:port, split into lines."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                data = self.sock.recv(65535)
                self.lines.extend(data.decode(errors="replace").splitlines())

    def __enter__(self) -> StatsdListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@dataclass
class Metric:
    name: str
    tags: dict[str, str]
    value: float
    kind: str


def parse_statsd(line: str) -> Metric | None:
    """``prefix.name,tag=v,...:value|type`` (StatsD with InfluxDB tags) -> Metric."""
    try:
        head, rest = line.rsplit(":", 1)
        value, kind = rest.split("|")[:2]
    except ValueError:
        return None
    name, *tags = head.split(",")
    return Metric(name, dict(t.split("=", 1) for t in tags if "=" in t), float(value), kind)


@dataclass
class Observed:
    dataset: EmbeddingDataset
    pg_dsn: str
    asset_uri: str
    first: dict[str, Any]
    second: dict[str, Any]
    consumer_runs_after_first: list[dict[str, Any]]
    consumer_runs_after_second: list[dict[str, Any]]
    consumer_change: Any
    asset_events_after_first: int
    asset_events_after_second: int
    queued_after_second: int
    statsd_first_run: list[str]
    lineage_first_run: list[dict[str, Any]] = field(default_factory=list)


def _lineage_events(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json*")) if p.is_file()]


def _asset_events(cluster: AirflowCluster, uri: str) -> int:
    assets = cluster.request("GET", f"/api/v2/assets?uri_pattern={quote(uri, safe='')}")["assets"]
    asset = next(a for a in assets if a["uri"] == uri)
    return int(cluster.request("GET", f"/api/v2/assets/events?asset_id={asset['id']}")["total_entries"])


def _queued(cluster: AirflowCluster, dag_id: str) -> int:
    try:
        return int(cluster.request("GET", f"/api/v2/dags/{dag_id}/assets/queuedEvents")["total_entries"])
    except RuntimeError as exc:  # 404 when nothing is queued
        if "HTTP 404" in str(exc):
            return 0
        raise


@pytest.fixture(scope="module")
def observed(
    tmp_path_factory: pytest.TempPathFactory,
    postgres: EmbeddedPostgres,
    sample_dataset: EmbeddingDataset,
    api_server: ServerProcess,
) -> Iterator[Observed]:
    assert sample_dataset.invalid_prefix == 0 and not sample_dataset.odd_vectors  # every row is storable
    tmp = tmp_path_factory.mktemp("observability")
    pg_dsn = postgres.create_database("t_observability")
    dbname = pg_dsn.rsplit("/", 1)[1].split("?")[0]
    host_port = pg_dsn.split("@")[-1].split("/")[0]
    asset_uri = f"postgres://{host_port}/{dbname}/public/recruit_embedding"
    metadata_dsn = postgres.create_database("airflow_observability_meta").replace(
        "postgresql://", "postgresql+psycopg://"
    )
    lineage_dir = tmp / "lineage"
    lineage_dir.mkdir()
    server, ai_target = start_ai_server(sample_dataset)
    with StatsdListener() as statsd:
        env = airflow_env(
            tmp / "airflow-home",
            postgres_dsn=pg_dsn,
            embedding_target=ai_target,
            cache_target=api_server.target,
            extra={
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_dsn,
                "RECRUIT_EMBEDDING_RETRIES": "0",
                "RECRUIT_EMBEDDING_ASSET_URI": asset_uri,
                "AIRFLOW__METRICS__STATSD_ON": "True",
                "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
                "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
                "AIRFLOW__METRICS__STATSD_PREFIX": STATSD_PREFIX,
                "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True",
                "AIRFLOW__OPENLINEAGE__NAMESPACE": "observability-test",
                "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                    {"type": "file", "log_file_path": str(lineage_dir / "event")}
                ),
            },
        )
        cluster = AirflowCluster(env, log_dir=tmp / "logs")
        try:
            cluster.migrate()
            cluster.start()
            for dag_id in (INGEST, CONSUMER):
                cluster.wait_for_dag(dag_id)
                cluster.set_paused(dag_id, False)

            first = cluster.wait_for_run(INGEST, run_id=cluster.trigger(INGEST, {"rows_per_partition": 1500}))
            consumer = cluster.wait_for_run(CONSUMER, run_type="asset_triggered")
            change = cluster.xcom(consumer, "read_change")
            time.sleep(3)  # the last UDP packets and lineage files of the first run
            statsd_first = list(statsd.lines)
            lineage_first = _lineage_events(lineage_dir)
            consumer_after_first = cluster.runs(CONSUMER)
            events_after_first = _asset_events(cluster, asset_uri)

            second = cluster.wait_for_run(INGEST, run_id=cluster.trigger(INGEST))
            time.sleep(15)  # several scheduler loops (heartbeat 2 s): time to create a run if it would
            observed = Observed(
                dataset=sample_dataset,
                pg_dsn=pg_dsn,
                asset_uri=asset_uri,
                first={"run": first, "tasks": cluster.task_states(first)},
                second={"run": second, "tasks": cluster.task_states(second)},
                consumer_runs_after_first=consumer_after_first,
                consumer_runs_after_second=cluster.runs(CONSUMER),
                consumer_change=change,
                asset_events_after_first=events_after_first,
                asset_events_after_second=_asset_events(cluster, asset_uri),
                queued_after_second=_queued(cluster, CONSUMER),
                statsd_first_run=statsd_first,
                lineage_first_run=lineage_first,
            )
        except BaseException:
            print(cluster.log_tails())
            raise
        finally:
            cluster.stop()
            server.stop(0)  # type: ignore[attr-defined]
    yield observed


def test_a_run_that_changed_rows_triggers_the_consumer_with_the_extra(observed: Observed) -> None:
    ids = observed.dataset.ids
    assert observed.first["tasks"]["announce_change"] == "success"
    assert [r["run_type"] for r in observed.consumer_runs_after_first] == ["asset_triggered"]
    assert observed.asset_events_after_first == 1
    extra = {"rows_changed": len(ids), "checkpoint": ids[-1]}
    assert observed.consumer_change == {
        "events": 1,
        "rows_changed": len(ids),
        "checkpoint": ids[-1],
        "extras": [extra],
    }


def test_a_run_that_changed_nothing_triggers_no_consumer(observed: Observed) -> None:
    assert observed.second["tasks"]["announce_change"] == "skipped"
    assert observed.second["run"]["state"] == "success"
    assert observed.asset_events_after_second == observed.asset_events_after_first == 1
    assert observed.queued_after_second == 0
    assert len(observed.consumer_runs_after_second) == 1


def _ours(lines: list[str]) -> list[Metric]:
    metrics = [parse_statsd(line) for line in lines]
    return [m for m in metrics if m is not None and m.name.startswith(f"{STATSD_PREFIX}.embedding.")]


def test_statsd_metrics_of_one_run(observed: Observed) -> None:
    metrics = _ours(observed.statsd_first_run)
    names = {m.name for m in metrics}
    p = f"{STATSD_PREFIX}."
    assert names == {
        p + ROWS_RECEIVED,
        p + ROWS_STORED,
        p + ROWS_DEAD_LETTERED,
        p + ROWS_DELETED,
        p + ROWS_PER_SECOND,
        p + RECALL,
        p + WRITERS,
        p + CACHE_DELIVERED,
        p + CACHE_PENDING,
    }, names
    rows = len(observed.dataset.ids)

    def total(name: str) -> float:
        return sum(m.value for m in metrics if m.name == p + name)

    # Two mapped ingest tasks (1500 rows a partition), each counting its own rows.
    counters = [m for m in metrics if m.name == p + ROWS_RECEIVED]
    assert len(counters) == 2 and {m.kind for m in counters} == {"c"}
    assert total(ROWS_RECEIVED) == total(ROWS_STORED) == rows
    assert total(ROWS_DEAD_LETTERED) == 0
    assert total(ROWS_DELETED) == 0  # a first load deletes nothing
    # The first load built the ANN index: the recall gate measured it (storage/recall.py).
    (recall,) = [m for m in metrics if m.name == p + RECALL]
    assert recall.kind == "g" and 0.95 <= recall.value <= 1.0, recall
    # Each ingest task reports its share of the DAG's writer budget (4 writers by default) as it
    # changes, and 0 when it leaves: summed over the tasks, the writers on the database now.
    writers: dict[str, list[float]] = {}
    for m in metrics:
        if m.name == p + WRITERS:
            index = m.tags.get("map_index")
            assert m.kind == "g" and m.tags == {"dag_id": INGEST, "stream": "recruit", "map_index": index}, m
            writers.setdefault(str(index), []).append(m.value)
        elif m.name.startswith((p + "embedding.rows", p + RECALL)):
            assert m.tags == {"dag_id": INGEST, "stream": "recruit"}, m
        else:
            assert m.tags == {"dag_id": INGEST, "target": "recruit"}, m
    assert set(writers) == {"0", "1"}, writers
    for values in writers.values():
        assert values[-1] == 0 and values[:-1] and all(1 <= v <= 4 for v in values[:-1]), writers
    (rate,) = [m for m in metrics if m.name == p + ROWS_PER_SECOND]
    assert rate.kind == "g" and rate.value > 0
    # One outbox entry per writer connection that changed rows, all delivered in one call.
    with psycopg.connect(observed.pg_dsn) as conn:
        row = conn.execute("SELECT count(*) FROM embedding_cache_outbox WHERE delivered_at IS NOT NULL").fetchone()
    assert row is not None and row[0] > 0
    (delivered,) = [m for m in metrics if m.name == p + CACHE_DELIVERED]
    (pending,) = [m for m in metrics if m.name == p + CACHE_PENDING]
    assert delivered.kind == "c" and delivered.value == row[0]
    assert pending.kind == "g" and pending.value == 0


def test_openlineage_events_name_the_ai_server_and_the_tables(observed: Observed) -> None:
    ingest_complete = [
        e
        for e in observed.lineage_first_run
        if e.get("eventType") == "COMPLETE" and e.get("job", {}).get("name", "").endswith(".ingest")
    ]
    assert len(ingest_complete) == 2, [e.get("job", {}).get("name") for e in observed.lineage_first_run]
    host_port = observed.asset_uri.split("/")[2]
    dbname = observed.asset_uri.split("/")[3]
    stored = 0
    for event in ingest_complete:
        (source,) = event["inputs"]
        assert source["name"] == "recruit" and source["namespace"].startswith("grpc://127.0.0.1:")
        outputs = {o["name"]: o for o in event["outputs"]}
        assert set(outputs) == {
            f"{dbname}.public.{t}" for t in ("recruit_metadata", "recruit_embedding", "recruit_embedding_dlq")
        }
        for out in outputs.values():
            assert out["namespace"] == f"postgres://{host_port}"
        embedding = outputs[f"{dbname}.public.recruit_embedding"]
        fields = {f["name"]: f["type"] for f in embedding["facets"]["schema"]["fields"]}
        assert fields["id"] == "uuid" and fields["vector"] == "vector(384)", fields
        metadata_fields = [
            f["name"] for f in outputs[f"{dbname}.public.recruit_metadata"]["facets"]["schema"]["fields"]
        ]
        assert metadata_fields[:5] == ["id", "company_name", "exp_years", "english_level", "primary_keyword"]
        rows = embedding["outputFacets"]["outputStatistics"]["rowCount"]
        assert outputs[f"{dbname}.public.recruit_metadata"]["outputFacets"]["outputStatistics"]["rowCount"] == rows
        assert outputs[f"{dbname}.public.recruit_embedding_dlq"]["outputFacets"]["outputStatistics"]["rowCount"] == 0
        stored += rows
    assert stored == len(observed.dataset.ids)
