"""``EmbeddingStreamService`` over a loaded :class:`EmbeddingDataset`, with health checking."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import grpc

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.ai_server.digest import DatasetDigests, selected_chunks
from airflow_embedding_provider.digest import HASH_VERSION, pack_hashes
from airflow_embedding_provider.grpc_server import CallSlots, add_health, bind_port, new_server, wait_for_stop_signal
from airflow_embedding_provider.partitions import DEFAULT_MAX_PARTITIONS, DEFAULT_ROWS_PER_PARTITION
from airflow_embedding_provider.security import ServerSecurity
from airflow_embedding_provider.wire import embedding_pb2, embedding_pb2_grpc
from airflow_embedding_provider.wire.contract import (
    DEFAULT_CHUNK_SIZE,
    EMBEDDING_SERVICE,
    GRPC_DEFAULT_MESSAGE_BYTES,
    MAX_CHUNK_BYTES,
    max_chunk_size,
)
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes

log = logging.getLogger(__name__)

SERVICE_NAME = EMBEDDING_SERVICE
#: Streams served at once: the fan-out of the ingest DAG (its ``max_partitions``), each mapped task
#: one stream. More are refused with RESOURCE_EXHAUSTED (the task's hook retries with backoff).
DEFAULT_MAX_STREAMS = DEFAULT_MAX_PARTITIONS
#: Threads beyond the streams' for health checks, PlanPartitions and refusals: a stream that waits
#: on a slow reader holds its thread, and these calls must still be answered then.
UNARY_THREADS = 8
#: Rows a ``RangeDigestPage``: 24 bytes a row, 1.5 MiB a message.
DEFAULT_DIGEST_PAGE_ROWS = 65_536


class RejectLedger:
    """What the batch side reported rejecting (docs/design.md §11: a rejected row is reported to the AI server).

    Counted per distinct row id, the latest report winning, so a retried partition that reports
    the same rows again counts them once; rows without a valid id are counted per report.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_id: dict[str, str] = {}
        self._without_id: Counter[str] = Counter()
        self.reports = 0

    def record(self, report: embedding_pb2.RejectReport) -> int:
        kinds: Counter[str] = Counter()
        with self._lock:
            self.reports += 1
            for row in report.rows:
                kinds[row.error_kind] += 1
                if row.id:
                    self._by_id[row.id] = row.error_kind
                else:
                    self._without_id[row.error_kind] += 1
        if kinds:
            example = report.rows[0]
            log.warning(
                "ReportRejects from %s: %d of %d row(s) rejected by the batch side: %s (e.g. %s %s: %s)",
                report.source or "-",
                len(report.rows),
                report.rows_received,
                ", ".join(f"{kind} {n}" for kind, n in kinds.most_common()),
                example.id or "(no id)",
                example.error_kind,
                example.message[:200],
            )
        else:
            log.info("ReportRejects from %s: no rejected rows of %d", report.source or "-", report.rows_received)
        return len(report.rows)

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(self._by_id.values()) + self._without_id


class EmbeddingStreamServicer(embedding_pb2_grpc.EmbeddingStreamServiceServicer):
    """Serves ``GetEmbeddings``; ``UploadEmbeddings`` belongs to the batch side's upload server."""

    def __init__(self, dataset: EmbeddingDataset, *, max_streams: int = DEFAULT_MAX_STREAMS) -> None:
        self._dataset = dataset
        # Row hashes at start-up (about 2 us a row), so that the first run's digests are not slower.
        self._digests = DatasetDigests(dataset).built()
        self._max_chunk = max_chunk_size(dataset.dimension)
        self.rejects = RejectLedger()
        self.streams = CallSlots(max_streams, what="streams", option="--max-streams")

    def ReportRejects(  # noqa: N802 - gRPC method name
        self, request: embedding_pb2.RejectReport, context: grpc.ServicerContext
    ) -> embedding_pb2.RejectReportAck:
        return embedding_pb2.RejectReportAck(rows_recorded=self.rejects.record(request))

    def GetServerStatus(  # noqa: N802 - gRPC method name
        self, request: embedding_pb2.ServerStatusRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.ServerStatus:
        data = self._dataset
        status = embedding_pb2.ServerStatus(
            rows=len(data), dimension=data.dimension, ignored_columns=data.ignored_columns, reports=self.rejects.reports
        )
        for (column, kind), n in sorted(data.defect_counts().items()):
            status.defects.add(column=column, error_kind=kind, rows=n)
        for kind, n in sorted(self.rejects.counts().items()):
            status.rejects.add(error_kind=kind, rows=n)
        return status

    def GetEmbeddings(  # noqa: N802 - gRPC method name
        self, request: embedding_pb2.StreamEmbeddingRequest, context: grpc.ServicerContext
    ) -> Iterator[RowChunkBytes]:
        with self.streams.hold(context):
            yield from self._stream(request, context)

    def _stream(
        self, request: embedding_pb2.StreamEmbeddingRequest, context: grpc.ServicerContext
    ) -> Iterator[RowChunkBytes]:
        size = request.chunk_size or DEFAULT_CHUNK_SIZE
        if not 1 <= size <= self._max_chunk:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk_size {size} is out of range: 1..{self._max_chunk} rows keep a message "
                f"under {MAX_CHUNK_BYTES // 2**20} MiB at dimension {self._dataset.dimension}",
            )
        start = self._start(request.last_processed_uuid, context)
        try:
            total = self._dataset.stop_at(request.until_uuid)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"until_uuid {request.until_uuid[:64]!r} is not a UUID")
        messages: Iterator[RowChunkBytes]
        if request.only_ids:
            try:
                positions = self._digests.positions(request.last_processed_uuid, request.until_uuid, request.only_ids)
            except ValueError as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            messages, start, total = selected_chunks(self._dataset, positions, size), 0, len(positions)
        else:
            messages = self._dataset.chunks(start, total, size)
        began, sent = time.monotonic(), 0
        peer = context.peer()
        try:
            for message in messages:
                if not context.is_active():
                    break
                yield message
                sent += len(message.rows)
        finally:
            elapsed = max(time.monotonic() - began, 1e-9)
            log.info(
                "GetEmbeddings peer=%s after=%s chunk_size=%d rows=%d seconds=%.2f rows/s=%.0f%s",
                peer,
                request.last_processed_uuid or "-",
                size,
                sent,
                elapsed,
                sent / elapsed,
                "" if start + sent >= total else " (ended early)",
            )

    def PlanPartitions(  # noqa: N802 - gRPC method name
        self, request: embedding_pb2.PartitionPlanRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.PartitionPlan:
        start = self._start(request.last_processed_uuid, context)
        rows_per_partition = request.rows_per_partition or DEFAULT_ROWS_PER_PARTITION
        max_partitions = request.max_partitions or DEFAULT_MAX_PARTITIONS
        if rows_per_partition < 1 or max_partitions < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "rows_per_partition and max_partitions must be positive")
        data = self._dataset
        plan = embedding_pb2.PartitionPlan(total_rows=len(data) - start, dimension=data.dimension)
        after = request.last_processed_uuid
        for index, (begin, end) in enumerate(data.plan(start, rows_per_partition, max_partitions)):
            until = data.ids[end - 1] if end - 1 >= data.invalid_prefix else ""
            plan.partitions.add(index=index, after_uuid=after, until_uuid=until, rows=end - begin)
            after = until
        log.info(
            "PlanPartitions after=%s rows=%d partitions=%d",
            request.last_processed_uuid or "-",
            plan.total_rows,
            len(plan.partitions),
        )
        return plan

    def RangeDigests(  # noqa: N802 - gRPC method name
        self, request: embedding_pb2.RangeDigestRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.RangeDigestReply:
        reply = embedding_pb2.RangeDigestReply(hash_version=HASH_VERSION)
        for bounds in request.ranges:
            try:
                found = self._digests.digest(bounds.after_uuid, bounds.until_uuid)
            except ValueError:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a range bound is not a UUID: {bounds}"[:200])
            reply.ranges.add(rows=found.rows, digest=found.digest)
        log.info("RangeDigests ranges=%d rows=%d", len(reply.ranges), sum(r.rows for r in reply.ranges))
        return reply

    def ListRangeDigests(  # noqa: N802 - gRPC method name
        self, request: embedding_pb2.RangeDigestListRequest, context: grpc.ServicerContext
    ) -> Iterator[embedding_pb2.RangeDigestPage]:
        page = request.page_rows or DEFAULT_DIGEST_PAGE_ROWS
        if page < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_rows must be positive")
        try:
            keys, hashes = self._digests.listing(request.range.after_uuid, request.range.until_uuid)
        except ValueError:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"a range bound is not a UUID: {request.range}"[:200])
        for begin in range(0, len(hashes), page):
            yield embedding_pb2.RangeDigestPage(
                ids=keys[16 * begin : 16 * (begin + page)], row_hashes=pack_hashes(hashes[begin : begin + page])
            )

    def _start(self, last_processed_uuid: str, context: grpc.ServicerContext) -> int:
        try:
            return self._dataset.start_after(last_processed_uuid)
        except ValueError:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"last_processed_uuid {last_processed_uuid[:64]!r} is not a UUID"
            )
            raise  # abort raises; this keeps type checkers aware


def build_server(
    dataset: EmbeddingDataset,
    *,
    host: str,
    port: int,
    max_streams: int = DEFAULT_MAX_STREAMS,
    security: ServerSecurity | None = None,
) -> tuple[grpc.Server, int]:
    """A started-to-be server bound to ``host:port`` (0 = a free port); returns it and the port.

    :param max_streams: ``GetEmbeddings`` streams served at once; one more is refused at once with
        RESOURCE_EXHAUSTED. The pool has a thread for each and :data:`UNARY_THREADS` more, so health
        checks and ``PlanPartitions`` are answered even when every stream waits on a slow reader.
    :param security: TLS, mutual TLS and bearer-token settings; ``None`` serves plaintext without a token.
    """
    servicer = EmbeddingStreamServicer(dataset, max_streams=max_streams)
    server = new_server(
        futures.ThreadPoolExecutor(max_workers=max_streams + UNARY_THREADS, thread_name_prefix="ai-server"),
        security=security,
        options=[("grpc.max_send_message_length", GRPC_DEFAULT_MESSAGE_BYTES)],
    )
    # Send through the bytes view: identical wire format, no float-by-float encoding.
    methods = (
        ("GetEmbeddings", grpc.unary_stream_rpc_method_handler, embedding_pb2.StreamEmbeddingRequest, RowChunkBytes),
        (
            "PlanPartitions",
            grpc.unary_unary_rpc_method_handler,
            embedding_pb2.PartitionPlanRequest,
            embedding_pb2.PartitionPlan,
        ),
        (
            "ReportRejects",
            grpc.unary_unary_rpc_method_handler,
            embedding_pb2.RejectReport,
            embedding_pb2.RejectReportAck,
        ),
        (
            "GetServerStatus",
            grpc.unary_unary_rpc_method_handler,
            embedding_pb2.ServerStatusRequest,
            embedding_pb2.ServerStatus,
        ),
        (
            "RangeDigests",
            grpc.unary_unary_rpc_method_handler,
            embedding_pb2.RangeDigestRequest,
            embedding_pb2.RangeDigestReply,
        ),
        (
            "ListRangeDigests",
            grpc.unary_stream_rpc_method_handler,
            embedding_pb2.RangeDigestListRequest,
            embedding_pb2.RangeDigestPage,
        ),
    )
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            name: kind(
                getattr(servicer, name), request_deserializer=req.FromString, response_serializer=resp.SerializeToString
            )
            for name, kind, req, resp in methods
        },
    )
    server.add_generic_rpc_handlers((handler,))
    add_health(server, SERVICE_NAME)
    return server, bind_port(server, host, port, security)


def log_dataset(dataset: EmbeddingDataset) -> None:
    """The start-up lines about the file: columns ignored (named once), defective rows by column."""
    if dataset.ignored_columns:
        log.info(
            "ignoring %d column(s) beyond the design's six: %s",
            len(dataset.ignored_columns),
            ", ".join(map(repr, dataset.ignored_columns)),
        )
    level = logging.WARNING if dataset.defects else logging.INFO
    log.log(level, "dataset: %s", dataset.describe_defects())


def serve(
    dataset: EmbeddingDataset,
    *,
    host: str,
    port: int,
    ready: threading.Event | None = None,
    max_streams: int = DEFAULT_MAX_STREAMS,
    security: ServerSecurity | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then finish in-flight streams for up to 10 s.

    :param max_streams: streams served at once (see :func:`build_server`).
    :param security: TLS, mutual TLS and bearer-token settings; ``None`` serves plaintext without a token.
    """
    server, bound = build_server(dataset, host=host, port=port, max_streams=max_streams, security=security)
    server.start()
    log.info("AI server listening on %s:%d: %d rows, dimension %d", host, bound, len(dataset), dataset.dimension)
    log_dataset(dataset)
    log.info("transport: %s", (security or ServerSecurity()).describe())
    print(
        f"AI server listening on {host}:{bound} ({len(dataset)} rows, dimension {dataset.dimension}, "
        f"up to {max_streams} streams)",
        flush=True,
    )
    wait_for_stop_signal(ready)
    log.info("shutting down")
    server.stop(grace=10).wait()
