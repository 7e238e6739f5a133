"""Operators of the ingest: plan partitions, stream each into pgvector (mapped), finalize.

``EmbeddingStreamPlanOperator`` asks the AI server to split the rows after the checkpoint into id
ranges; ``EmbeddingStreamToPgvectorOperator`` is mapped over them with ``expand`` (or run alone
over everything after the checkpoint); ``EmbeddingFinalizeOperator`` settles the run's
checkpoint, sums its totals, builds the ANN index and checks the DLQ budget.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from functools import cached_property
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
from airflow_embedding_provider.hooks.postgres import EmbeddingPostgresHook
from airflow_embedding_provider.lineage import ingest_lineage, openlineage_available
from airflow_embedding_provider.metrics import record_rate, record_recall, record_rows, record_writers
from airflow_embedding_provider.operators._rendered import flag, uuid_or_none, value_or_none
from airflow_embedding_provider.partitions import DEFAULT_MAX_PARTITIONS, DEFAULT_ROWS_PER_PARTITION, Partition
from airflow_embedding_provider.pipeline import (
    DEFAULT_DB_CONNECTIONS,
    DEFAULT_SUB_BATCH_SIZE,
    IngestStats,
    default_chunk_size,
    ingest_chunks,
    prefetch,
)
from airflow_embedding_provider.range_sync import open_ended, plan_sync, range_inputs
from airflow_embedding_provider.rows import DEFAULT_DIMENSION
from airflow_embedding_provider.storage.checkpoint import (
    DEFAULT_STREAM,
    PartitionKey,
    advance_checkpoint,
    deleted_in_run,
    load_plan,
    low_watermark,
    read_checkpoint,
    resume_point,
    save_plan,
)
from airflow_embedding_provider.storage.outbox import DEFAULT_CACHE_TARGET, CacheRequest
from airflow_embedding_provider.storage.recall import (
    DEFAULT_MIN_RECALL,
    DEFAULT_RECALL_QUERIES,
    RecallReport,
    RecallSample,
    recall_sample,
    tune_search,
)
from airflow_embedding_provider.storage.schema import (
    ANN_METHODS,
    DEFAULT_ANN_METHOD,
    DEFAULT_MAX_BUILD_MEMORY,
    DEFAULT_TABLES,
    TableNames,
    ann_index_method,
    apply_schema,
    ensure_ann_index,
)
from airflow_embedding_provider.storage.search import read_search_setting
from airflow_embedding_provider.storage.session import without_statement_timeout
from airflow_embedding_provider.storage.sync import DEFAULT_MAX_DELETE_FRACTION, stored_count
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.storage.writer_budget import WriterBudget
from airflow_embedding_provider.wire.contract import MAX_CHUNK_BYTES, max_chunk_size

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import RuntimeTaskInstanceProtocol

#: Airflow's default ``[core] max_map_length``; a plan never maps wider.
MAX_MAP_LENGTH = 1024
#: ``finalize`` fails the run when more than this share of the received rows went to the DLQ.
DEFAULT_MAX_DLQ_FRACTION = 0.05


def _build_ann_index(
    operator: BaseOperator,
    conn: psycopg.Connection,
    method: str,
    max_build_memory: str | int = DEFAULT_MAX_BUILD_MEMORY,
    *,
    tables: TableNames = DEFAULT_TABLES,
) -> str | None:
    """Build the ANN index when missing (see :func:`ensure_ann_index`); the method built, if any.
    An unknown method fails the task without retries: it is configuration, not a passing fault."""
    method = str(method).strip().lower()
    began = time.monotonic()
    try:
        with without_statement_timeout(conn):
            if not ensure_ann_index(conn, tables, method, max_build_memory=max_build_memory):
                return None
    except ValueError as exc:  # an unknown method
        raise AirflowFailException(str(exc)) from exc
    operator.log.info("built the %s index on %s in %.1f s", method, tables.embedding, time.monotonic() - began)
    return method


def _report_rejects(operator: BaseOperator, hook: GrpcEmbeddingHook, source: str, stats: IngestStats) -> None:
    """Tell the AI server which rows went to the DLQ and why (docs/design.md §11). The rows are stored in
    the DLQ already, so a server that cannot take the report (an older one) costs a warning only."""
    try:
        hook.report_rejects(source=source, rows_received=stats.rows_received, rejects=stats.rejects)
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "ERROR"
        operator.log.warning("could not report %d rejected row(s) to the AI server: %s", len(stats.rejects), code)


class EmbeddingStreamPlanOperator(BaseOperator):
    """Splits the source into id ranges and returns those a mapped ingest must sync (small JSON).

    Without ``last_processed_uuid`` the whole source is split into ranges, and the source's digest
    of each range (``RangeDigests``) is compared with the stored rows' (storage/sync.py): only
    ranges that differ are handed out (every range with ``full_refresh``), whatever the id order,
    and their tasks stream only the rows that differ. With ``last_processed_uuid`` the ranges
    after that id are handed out and stream every row, as a resume after that id. In both cases a
    range ends equal to the source: stored rows the source no longer lists are deleted.

    Deleting is guarded: a plan that would delete more than ``max_delete_fraction`` of the stored
    rows lets no range delete (the rows are still stored; ``finalize`` then fails the run with the
    counts). The plan is stored per DAG run, so a retried planning task hands out the same ranges.

    :param grpc_conn_id: ``embedding_grpc`` connection of the AI server.
    :param postgres_conn_id: PostgreSQL connection.
    :param last_processed_uuid: resume strictly after this id (templated; empty = checkpoint).
    :param full_refresh: compare every range row by row, whatever its digest (templated).
    :param max_delete_fraction: the share of the stored rows a run may delete (templated).
    :param rows_per_partition: the plan aims at partitions of about this many rows.
    :param max_partitions: never more partitions than this (at most ``max_map_length``).
    :param dimension: vector dimension of the tables (the schema is applied here).
    :param stream_name: the checkpoint row of this stream.
    """

    template_fields: Sequence[str] = (
        "last_processed_uuid",
        "full_refresh",
        "rows_per_partition",
        "max_partitions",
        "max_delete_fraction",
    )

    def __init__(
        self,
        *,
        grpc_conn_id: str = GrpcEmbeddingHook.default_conn_name,
        postgres_conn_id: str = EmbeddingPostgresHook.default_conn_name,
        last_processed_uuid: str | None = None,
        full_refresh: bool | str = False,
        rows_per_partition: int | str = DEFAULT_ROWS_PER_PARTITION,
        max_partitions: int | str = DEFAULT_MAX_PARTITIONS,
        max_delete_fraction: float | str = DEFAULT_MAX_DELETE_FRACTION,
        dimension: int = DEFAULT_DIMENSION,
        stream_name: str = DEFAULT_STREAM,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.grpc_conn_id = grpc_conn_id
        self.postgres_conn_id = postgres_conn_id
        self.last_processed_uuid = last_processed_uuid
        self.full_refresh = full_refresh
        self.rows_per_partition = rows_per_partition
        self.max_partitions = max_partitions
        self.max_delete_fraction = max_delete_fraction
        self.dimension = dimension
        self.stream_name = stream_name

    @cached_property
    def postgres_hook(self) -> EmbeddingPostgresHook:
        """The tables and connections of ``postgres_conn_id``."""
        return EmbeddingPostgresHook(postgres_conn_id=self.postgres_conn_id)

    def execute(self, context: Context) -> list[dict[str, Any]]:
        max_partitions = min(int(self.max_partitions), MAX_MAP_LENGTH)
        requested = uuid_or_none(self.last_processed_uuid)
        run_id = context["ti"].run_id
        with self.postgres_hook.connections(1) as (conn,):
            apply_schema(conn, self.dimension, self.postgres_hook.tables)
            existing = load_plan(conn, self.postgres_hook.tables, self.stream_name, run_id)
            if existing:
                self.log.info("this run was planned before (a retry): reusing its %d partitions", len(existing))
                context["ti"].xcom_push(key="start_after", value=existing[0].after_uuid)
                return [p.as_dict() | {"label": p.label} for p in existing]
            stored = read_checkpoint(conn, self.postgres_hook.tables, self.stream_name)
            full = flag(self.full_refresh, "full_refresh")
            start = requested
            with contextlib.closing(GrpcEmbeddingHook(self.grpc_conn_id)) as hook:
                ranges, total = hook.plan_partitions(
                    after=start, rows_per_partition=int(self.rows_per_partition), max_partitions=max_partitions
                )
                partitions = plan_sync(
                    conn,
                    hook,
                    open_ended(ranges, start),
                    forced=full or start is not None,
                    every_row=start is not None,
                    max_delete_fraction=float(self.max_delete_fraction),
                    settle_end=start is None,
                    tables=self.postgres_hook.tables,
                    log=self.log,
                ).partitions
            partitions = save_plan(conn, self.postgres_hook.tables, self.stream_name, run_id, partitions)
            if start is None and ranges and not partitions and ranges[-1].until_uuid:
                # Every range equals the source: everything up to its last id is stored.
                with conn.transaction(), conn.cursor() as cur:
                    advance_checkpoint(cur, self.postgres_hook.tables, self.stream_name, ranges[-1].until_uuid)
        self.log.info(
            "%d rows after %s (requested %s, full refresh %s, stored checkpoint %s) in %d range(s), %d to sync: %s",
            total,
            start or "the beginning",
            requested or "-",
            full,
            stored or "-",
            len(ranges),
            len(partitions),
            ", ".join(p.label for p in partitions) or "none",
        )
        context["ti"].xcom_push(key="start_after", value=start)
        return [p.as_dict() | {"label": p.label} for p in partitions]


class EmbeddingStreamToPgvectorOperator(BaseOperator):
    """Streams rows from the AI server (``GetEmbeddings``) and upserts them into pgvector.

    Each chunk is validated and re-split into sub-batches written by ``db_connections`` writers;
    every sub-batch commits its ``recruit_metadata`` rows, then its ``recruit_embedding`` rows, its
    rejected rows (to ``recruit_embedding_dlq``) and the position it completes, in one transaction.

    With ``partition`` (from :class:`EmbeddingStreamPlanOperator`, through ``expand``) it streams
    that id range and records progress on it, so that a retry resumes inside the range; without,
    it streams everything after ``last_processed_uuid`` or the stored checkpoint. Returns counts;
    the position reached is also pushed as XCom ``checkpoint``.

    :param grpc_conn_id: ``embedding_grpc`` connection of the AI server.
    :param postgres_conn_id: PostgreSQL connection (pgvector installed or installable).
    :param partition: one range of the plan (a dict), or ``None`` for a single, unmapped stream.
    :param last_processed_uuid: without ``partition``: resume after this id (templated).
    :param chunk_size: rows a gRPC message (templated); by default the sub-batch's default, or
        fewer where a message cannot hold that many vectors of ``dimension`` (``default_chunk_size``).
    :param sub_batch_size: rows a database transaction (templated).
    :param db_connections: database connections (and writer threads) of this task.
    :param db_writer_budget: the most writers that all ingest tasks on this database run at once
        (storage/writer_budget.py); the task writes on its share of it, between 1 and
        ``db_connections``, on one more connection that holds its place. ``None`` or 0: no
        budget, every task writes on all of its connections.
    :param dimension: the vector dimension the tables are declared with.
    :param stream_name: the checkpoint row this ingest advances.
    :param cache_target: the API server cache that changed rows make stale (outbox entry).
    :param build_ann_index: without ``partition``: build the ANN index after the load.
    :param ann_index_method: ``ivfflat`` or ``hnsw`` (templated); see :func:`ensure_ann_index`.
    :param max_build_memory: the most ``maintenance_work_mem`` the index build sets for itself
        (a PostgreSQL size such as ``"1GB"``); see :func:`ensure_ann_index`.
    """

    template_fields: Sequence[str] = (
        "grpc_conn_id",
        "postgres_conn_id",
        "last_processed_uuid",
        "chunk_size",
        "sub_batch_size",
        "ann_index_method",
    )
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        grpc_conn_id: str = GrpcEmbeddingHook.default_conn_name,
        postgres_conn_id: str = EmbeddingPostgresHook.default_conn_name,
        partition: dict[str, Any] | None = None,
        last_processed_uuid: str | None = None,
        chunk_size: int | str | None = None,
        sub_batch_size: int | str = DEFAULT_SUB_BATCH_SIZE,
        db_connections: int = DEFAULT_DB_CONNECTIONS,
        db_writer_budget: int | None = None,
        dimension: int = DEFAULT_DIMENSION,
        stream_name: str = DEFAULT_STREAM,
        cache_target: str | None = DEFAULT_CACHE_TARGET,
        build_ann_index: bool = True,
        ann_index_method: str = DEFAULT_ANN_METHOD,
        max_build_memory: str = DEFAULT_MAX_BUILD_MEMORY,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_build_memory = max_build_memory
        self.grpc_conn_id = grpc_conn_id
        self.postgres_conn_id = postgres_conn_id
        self.partition = partition
        self.last_processed_uuid = last_processed_uuid
        self.chunk_size = chunk_size
        self.sub_batch_size = sub_batch_size
        self.db_connections = db_connections
        self.db_writer_budget = db_writer_budget
        self.dimension = dimension
        self.stream_name = stream_name
        self.cache_target = cache_target
        self.build_ann_index = build_ann_index
        self.ann_index_method = ann_index_method
        #: rows this task wrote per output (metadata, embedding, dlq), for OpenLineage
        self._lineage_counts: dict[str, int] = {}

    @cached_property
    def postgres_hook(self) -> EmbeddingPostgresHook:
        """The tables and connections of ``postgres_conn_id``."""
        return EmbeddingPostgresHook(postgres_conn_id=self.postgres_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        ti = context["ti"]
        part = Partition.from_dict(self.partition) if self.partition else None
        if part is not None:
            context["partition_label"] = part.label  # type: ignore[typeddict-unknown-key]  # map_index_template
        given = value_or_none(self.chunk_size)
        chunk_size = default_chunk_size(int(self.dimension)) if given is None else int(given)
        sub_batch = int(self.sub_batch_size)
        for name, value in (("chunk_size", chunk_size), ("sub_batch_size", sub_batch)):
            if value < 1:
                # Configuration, not a passing fault: no retries. 0 rows a transaction never advances.
                raise AirflowFailException(f"{name} must be at least 1 row, got {value}")
        limit = max_chunk_size(int(self.dimension))
        if chunk_size > limit:
            # The AI server would refuse the stream (INVALID_ARGUMENT) on every try: say so once.
            raise AirflowFailException(
                f"chunk_size {chunk_size} is above {limit}, the most rows of dimension {self.dimension} that keep a "
                f"gRPC message under {MAX_CHUNK_BYTES // 2**20} MiB: lower the chunk_size Param"
            )
        budget = int(self.db_writer_budget or 0)
        if budget < 0:
            raise AirflowFailException(f"db_writer_budget must be at least 1 writer (or 0 for none), got {budget}")
        origin = {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "map_index": ti.map_index}
        source = f"{ti.dag_id}/{ti.run_id}/{ti.map_index}"
        width = max(1, int(self.db_connections))
        with self.postgres_hook.connections(width + (1 if budget else 0)) as opened:
            conns = opened[:width]
            conn = conns[0]
            key: PartitionKey | None = None
            if part is None:
                apply_schema(conn, self.dimension, self.postgres_hook.tables)
                requested = uuid_or_none(self.last_processed_uuid)
                stored = read_checkpoint(conn, self.postgres_hook.tables, self.stream_name)
                start, until = (requested if requested is not None else stored), None
            else:
                key = PartitionKey(self.stream_name, ti.run_id, part.index)
                start, committed, done = resume_point(conn, self.postgres_hook.tables, key, part)
                if done:
                    self.log.info("partition %s was finished by an earlier try", part.label)
                    return {"partition": part.index, "rows_received": 0, "already_done": True}
                until = part.until_uuid
                if committed:
                    self.log.info(
                        "resuming partition %s after %s (an earlier try stored up to there)", part.label, committed
                    )
            self.log.info(
                "streaming rows after %s up to %s, chunk size %d, sub-batches of %d on %d connection(s)",
                start or "the beginning",
                until or "the end",
                chunk_size,
                sub_batch,
                len(conns),
            )
            # One outbox entry per writer connection, so that writers never wait on each other's row.
            writers = [
                ChunkWriter(
                    c,
                    dimension=self.dimension,
                    tables=self.postgres_hook.tables,
                    stream_name=self.stream_name,
                    cache_request=CacheRequest(self.cache_target, f"{source}/{i}") if self.cache_target else None,
                )
                for i, c in enumerate(conns)
            ]
            # The task holds its place in the budget while it writes, not during the index build.
            place = (
                WriterBudget(
                    opened[width],
                    budget=budget,
                    writers=width,
                    on_change=functools.partial(
                        record_writers, dag_id=ti.dag_id, stream=self.stream_name, map_index=ti.map_index
                    ),
                )
                if budget
                else None
            )
            with contextlib.closing(GrpcEmbeddingHook(self.grpc_conn_id)) as hook, place or contextlib.nullcontext():
                reconcile, only_ids = (
                    range_inputs(conn, hook, part, tables=self.postgres_hook.tables, log=self.log)
                    if part is not None
                    else (None, None)
                )
                stats = ingest_chunks(
                    prefetch(hook.stream_chunks(after=start, until=until, chunk_size=chunk_size, only_ids=only_ids)),
                    writers,
                    dimension=self.dimension,
                    sub_batch_size=sub_batch,
                    origin=origin,
                    partition=key,
                    reconcile=reconcile,
                    writer_share=place.share if place is not None else None,
                )
                _report_rejects(self, hook, source if part is None else f"{source} ({part.label})", stats)
            if part is None and self.build_ann_index:
                _build_ann_index(
                    self, conn, self.ann_index_method, self.max_build_memory, tables=self.postgres_hook.tables
                )
        result = stats.as_dict() | {"start_after": start, "partition": None if part is None else part.index}
        result["last_processed_uuid"] = stats.last_processed_uuid or start
        self.log.info(
            "stored %d rows (%d new, %d changed, %d unchanged), deleted %d (%d held back by the guard), "
            "%d to the DLQ %s, in %d chunks, %.1f s, %.0f rows/s; position %s",
            stats.rows_stored,
            stats.inserted,
            stats.updated,
            stats.unchanged,
            stats.deleted,
            stats.deletes_blocked,
            stats.rows_dlq,
            dict(stats.dlq_by_reason),
            stats.chunks,
            stats.seconds,
            stats.rows_per_second,
            result["last_processed_uuid"],
        )
        ti.xcom_push(key="checkpoint", value=result["last_processed_uuid"])
        record_rows(result, dag_id=ti.dag_id, stream=self.stream_name)
        self._lineage_counts = {"metadata": stats.rows_stored, "embedding": stats.rows_stored, "dlq": stats.rows_dlq}
        return result

    def get_openlineage_facets_on_complete(self, task_instance: RuntimeTaskInstanceProtocol) -> Any:
        """OpenLineage: the AI server's stream in; the two tables and the DLQ out, with their
        columns and the rows this task wrote. ``None`` without the OpenLineage provider."""
        if not openlineage_available():
            return None
        target = GrpcEmbeddingHook(self.grpc_conn_id).settings.target
        conn = self.postgres_hook.get_psycopg3_conn()
        with contextlib.closing(conn):
            return ingest_lineage(
                grpc_target=target,
                stream_name=self.stream_name,
                conn=conn,
                tables=self.postgres_hook.tables,
                row_counts=self._lineage_counts,
            )


class EmbeddingFinalizeOperator(BaseOperator):
    """Settles a mapped run: the checkpoint (low watermark), the ANN index, totals, DLQ budget.

    Runs after every partition succeeded. Sums the partitions' counts into one result (XCom),
    pushes the stream's checkpoint as XCom ``checkpoint``, builds the ANN index after a first
    load, and fails the run when more than ``max_dlq_fraction`` of the received rows went to the
    DLQ (after everything good and everything rejected is stored), naming the top reasons.

    After a load that built the index or changed rows (or while no setting was ever measured) it
    runs the recall gate (storage/recall.py): the smallest ``ivfflat.probes`` / ``hnsw.ef_search``
    whose top-10 matches exact search on ``min_recall`` of sampled queries is stored for every
    search; XCom ``recall`` and the result's ``recall`` key carry recall_at_10, the setting and
    latency p50/p95. A target no setting reaches fails the run (no retries: a retry measures the
    same index), after the best setting measured is stored and everything else is settled.

    :param postgres_conn_id: PostgreSQL connection.
    :param ingest_task_id: the mapped ingest task whose results are summed.
    :param max_dlq_fraction: the share of rejected rows above which the run fails (templated).
    :param max_delete_fraction: the plan's deletion guard (templated); named in the failure of a
        run whose ranges held back deletions.
    :param stream_name: the checkpoint row of this stream.
    :param build_ann_index: build the ANN index when missing and the table has rows.
    :param ann_index_method: ``ivfflat`` or ``hnsw`` (templated); see :func:`ensure_ann_index`.
    :param max_build_memory: the most ``maintenance_work_mem`` the index build sets for itself (templated).
    :param min_recall: recall@10 the tuned search must reach (templated); ``None`` turns the gate off.
    :param recall_queries: sampled queries the gate measures with.
    """

    template_fields: Sequence[str] = (
        "max_dlq_fraction",
        "max_delete_fraction",
        "ann_index_method",
        "max_build_memory",
        "min_recall",
    )

    def __init__(
        self,
        *,
        postgres_conn_id: str = EmbeddingPostgresHook.default_conn_name,
        ingest_task_id: str = "ingest",
        max_dlq_fraction: float | str = DEFAULT_MAX_DLQ_FRACTION,
        max_delete_fraction: float | str = DEFAULT_MAX_DELETE_FRACTION,
        stream_name: str = DEFAULT_STREAM,
        build_ann_index: bool = True,
        ann_index_method: str = DEFAULT_ANN_METHOD,
        max_build_memory: str = DEFAULT_MAX_BUILD_MEMORY,
        min_recall: float | str | None = DEFAULT_MIN_RECALL,
        recall_queries: int = DEFAULT_RECALL_QUERIES,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.max_build_memory = max_build_memory
        self.min_recall = min_recall
        self.recall_queries = recall_queries
        self.postgres_conn_id = postgres_conn_id
        self.ingest_task_id = ingest_task_id
        self.max_dlq_fraction = max_dlq_fraction
        self.max_delete_fraction = max_delete_fraction
        self.stream_name = stream_name
        self.build_ann_index = build_ann_index
        self.ann_index_method = ann_index_method

    @cached_property
    def postgres_hook(self) -> EmbeddingPostgresHook:
        """The tables and connections of ``postgres_conn_id``."""
        return EmbeddingPostgresHook(postgres_conn_id=self.postgres_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        ti = context["ti"]
        pulled = ti.xcom_pull(task_ids=self.ingest_task_id)
        # One mapped task instance comes back as its value, several as a sequence of values.
        results = [pulled] if isinstance(pulled, dict) else [r for r in pulled or [] if isinstance(r, dict)]
        fields = (
            "rows_received",
            "inserted",
            "updated",
            "unchanged",
            "duplicates",
            "rows_dlq",
            "deleted",
            "deletes_blocked",
            "chunks",
        )
        totals: dict[str, int] = {name: sum(int(r.get(name, 0)) for r in results) for name in fields}
        reasons: Counter[str] = Counter()
        for r in results:
            reasons.update(r.get("dlq_by_reason", {}))
        with self.postgres_hook.connections(1) as (conn,), conn.transaction(), conn.cursor() as cur:
            watermark = low_watermark(cur, self.postgres_hook.tables, self.stream_name, ti.run_id)
            if watermark is not None:
                advance_checkpoint(cur, self.postgres_hook.tables, self.stream_name, watermark)
            # A try killed after its deleting transaction committed returned no result: count
            # the run's deletions where they were recorded.
            deleted = deleted_in_run(cur, self.postgres_hook.tables, self.stream_name, ti.run_id)
            if deleted is not None:
                totals["deleted"] = deleted
        with self.postgres_hook.connections(2) as (conn, side):
            checkpoint = read_checkpoint(conn, self.postgres_hook.tables, self.stream_name)
            built, sample = self._build_index_and_sample(conn, side) if self.build_ann_index else (None, None)
            changed = bool(built) or totals["inserted"] + totals["updated"] + totals.get("deleted", 0) > 0
            # Past the build, ``side`` is idle: a failed build or sample re-raised above, and only
            # the failed build cancels it (_build_index_and_sample).
            recall = self._recall_gate(conn, changed, sample, side=side)
            stored_rows = stored_count(conn, self.postgres_hook.tables)
        task_seconds = sum(float(r.get("seconds", 0)) for r in results)
        started = context["dag_run"].start_date
        seconds = (datetime.now(timezone.utc) - started).total_seconds() if started else 0.0
        summary: dict[str, Any] = totals | {
            "partitions": len(results),
            "seconds": round(seconds, 3),
            "rows_per_second": round(totals["rows_received"] / seconds, 1) if seconds > 0 else 0.0,
            "slowest_partition_seconds": max((float(r.get("seconds", 0)) for r in results), default=0.0),
            # Rows a second inside the ingest tasks, Airflow's own scheduling time left out.
            "task_rows_per_second": round(totals["rows_received"] / task_seconds, 1) if task_seconds > 0 else 0.0,
            "rows_stored": totals["inserted"] + totals["updated"] + totals["unchanged"],
            "dlq_by_reason": dict(reasons),
            "last_processed_uuid": checkpoint,
            "ann_index_built": built,
            "recall": recall,
        }
        ti.xcom_push(key="checkpoint", value=checkpoint)
        ti.xcom_push(key="recall", value=recall)
        record_rate(summary["rows_per_second"], dag_id=ti.dag_id, stream=self.stream_name)
        self.log.info("run total: %s", summary)
        held = totals["deletes_blocked"]
        if held:
            before = stored_rows - totals["inserted"]  # nothing was deleted: the new rows came on top
            raise AirflowFailException(
                f"the source no longer has {held} of the {before} stored rows ({held / max(before, 1):.1%}), above "
                f"max_delete_fraction {float(self.max_delete_fraction):g}: nothing was deleted, everything else is "
                f"stored. If the source really lost these rows, trigger the DAG with a higher max_delete_fraction "
                "Param; else fix the source file."
            )
        received, rejected = totals["rows_received"], totals["rows_dlq"]
        limit = float(self.max_dlq_fraction)
        if received and rejected / received > limit:
            top = ", ".join(f"{kind} {count}" for kind, count in reasons.most_common(5))
            raise AirflowFailException(
                f"{rejected} of {received} rows ({rejected / received:.1%}) went to the DLQ, above the allowed "
                f"{limit:.1%}; everything else is stored. Top reasons: {top}. Inspect recruit_embedding_dlq, "
                "fix the source or the configuration, then run recruit_embedding_dlq_replay."
            )
        failure = recall_failure(recall)
        if failure:
            raise AirflowFailException(failure)
        return summary

    def _build_index_and_sample(
        self, conn: psycopg.Connection, side: psycopg.Connection
    ) -> tuple[str | None, RecallSample | None]:
        """Build the ANN index when missing: the method built, if any, and the recall gate's sample.

        The gate's queries and their exact answers need no index, and an ivfflat build spends its
        first part (k-means) on one core (bench/RESULTS.md): while ``conn`` builds, the sample is
        taken on ``side`` (:func:`recall_sample`), so the gate after the build only measures settings.
        """
        tables = self.postgres_hook.tables
        method = str(self.ann_index_method).strip().lower()
        if self._min_recall() is None or method not in ANN_METHODS or ann_index_method(conn, tables) == method:
            return _build_ann_index(self, conn, method, self.max_build_memory, tables=tables), None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="recall-sample") as pool:
            taking = pool.submit(recall_sample, side, tables, queries=int(self.recall_queries))
            try:
                built = _build_ann_index(self, conn, method, self.max_build_memory, tables=tables)
            except BaseException:
                side.cancel_safe(timeout=5)  # the sample is of no use now: stop its read rather than wait
                raise
            sample = taking.result()
        return built, sample if built else None

    def _min_recall(self) -> float | None:
        """The gate's target as rendered, or ``None`` when the gate is off (``min_recall`` unset)."""
        given = value_or_none(self.min_recall)
        return None if given is None else float(given)

    def _recall_gate(
        self,
        conn: psycopg.Connection,
        changed: bool,
        sample: RecallSample | None = None,
        *,
        side: psycopg.Connection | None = None,
    ) -> dict[str, Any] | None:
        """Tune the search setting after a change (see the class docstring); what searches use now.
        ``sample``: the gate's queries, taken while the index was built (:meth:`_build_index_and_sample`).
        ``side``: a second idle connection the gate asks its queries over as well (PostgreSQL
        answers each on one core; :func:`tune_search`)."""
        min_recall = self._min_recall()
        if min_recall is None:
            return None
        stored = read_search_setting(conn, self.postgres_hook.tables)
        if stored is None:
            return None  # no ANN index: searches are exact
        if not changed and stored.tuned:
            self.log.info("recall gate: nothing changed; searches keep %s = %d", stored.name, stored.value)
            return {
                "measured": False,
                "setting": stored.name,
                "value": stored.value,
                "recall_at_10": stored.recall_at_10,
            }
        report = tune_search(
            conn,
            self.postgres_hook.tables,
            min_recall=min_recall,
            queries=int(self.recall_queries),
            sample=sample,
            side=() if side is None else (side,),
        )
        if report is None:
            return None
        result = report.as_dict() | {"measured": True}
        _report_recall(self, report)
        return result


def recall_failure(recall: dict[str, Any] | None) -> str | None:
    """What finalize fails with when the gate measured a recall below its target, else ``None``."""
    if not recall or recall.get("reached") is not False:
        return None
    return (
        f"recall@10 {recall['recall_at_10']:.3f} is below min_recall {recall['min_recall']:.3f} at every "
        f"{recall['setting']} tried ({recall['tried']}); searches now use the best one "
        f"({recall['setting']} = {recall['value']}). Everything is stored and the checkpoint settled. "
        "Raise ivfflat lists or switch RECRUIT_EMBEDDING_ANN_INDEX to hnsw, or lower min_recall."
    )


def _report_recall(operator: BaseOperator, report: RecallReport) -> None:
    """The one place finalize reports the recall gate: the log, and the recall gauge (metrics.py)."""
    level = logging.INFO if report.reached else logging.ERROR
    operator.log.log(
        level,
        "recall gate: recall@10 %.3f (target %.3f%s) with %s = %d over %d queries on %d rows; search latency "
        "p50 %.1f ms, p95 %.1f ms; tried %s; database default %s",
        report.recall_at_10,
        report.min_recall,
        "" if report.reached else ", NOT REACHED",
        report.setting,
        report.value,
        report.queries,
        report.rows_indexed,
        report.latency_ms_p50,
        report.latency_ms_p95,
        report.tried,
        "set" if report.database_default else "not set (no privilege)",
    )
    record_recall(report.recall_at_10, dag_id=operator.dag_id, stream=getattr(operator, "stream_name", DEFAULT_STREAM))


class EmbeddingCheckpointOperator(EmbeddingFinalizeOperator):
    """Deprecated: the former name of :class:`EmbeddingFinalizeOperator`, kept for one release.

    It takes the same arguments and does the same; creating one warns with ``DeprecationWarning``.
    """

    def __init__(self, **kwargs: Any) -> None:
        warnings.warn(
            "EmbeddingCheckpointOperator is deprecated and will be removed in the next release: "
            "use EmbeddingFinalizeOperator, which takes the same arguments",
            DeprecationWarning,
            stacklevel=2,
        )
        super().__init__(**kwargs)
