"""``EmbeddingStreamService.UploadEmbeddings``: the AI side pushes chunks, the batch side stores them.

The upload goes through the DAG's own storage path (:func:`~airflow_embedding_provider.pipeline.
ingest_chunks` with :class:`~airflow_embedding_provider.storage.writer.ChunkWriter`): the same
validation, DLQ, upserts, checkpoint and cache outbox; there is no second storage layer.

Backpressure: the handler pulls the next request only when the writers have room (at most
``prefetch_depth`` decoded chunks ahead and ``2 * db_connections`` sub-batches in the writers).
gRPC reads a message from the transport only when the request iterator asks for one, so a client
that sends faster than PostgreSQL writes is held back by HTTP/2 flow control, and the server's
memory does not grow with the upload's size.

Partial failure: every sub-batch commits on its own, so a client that aborts leaves everything
received committed; the server logs how far the upload got, and uploading again is harmless
(upserts; DLQ entries keyed by row hash).

Sync uploads (``RowChunk.sync`` on the first message, ``push --sync``): once every row has
arrived, stored rows whose id the upload did not have are deleted, in one transaction with the
upload's id list as evidence (storage/sync.py), unless that is more than the upload's
``max_delete_fraction`` of the stored rows: then none are, and the upload fails with the counts.
An upload that ends early deletes nothing.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from contextlib import ExitStack
from dataclasses import dataclass

import grpc
import numpy as np
import psycopg
from grpc_health.v1 import health

from airflow_embedding_provider.digest import row_hash
from airflow_embedding_provider.pipeline import DEFAULT_SUB_BATCH_SIZE, IngestStats, ingest_chunks, prefetch
from airflow_embedding_provider.rows import DEFAULT_DIMENSION, RowBatch
from airflow_embedding_provider.security import ServerSecurity, add_health, bind_port, new_server, wait_for_stop_signal
from airflow_embedding_provider.storage.outbox import CacheRequest
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, apply_schema
from airflow_embedding_provider.storage.sync import DEFAULT_MAX_DELETE_FRACTION, RangeSync, stored_count
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.codec import WireChunk, decode_chunk
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes

log = logging.getLogger(__name__)

SERVICE_NAME = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingStreamService"].full_name
UPLOAD_METHOD = f"/{SERVICE_NAME}/UploadEmbeddings"
DEFAULT_PORT = 50053
#: The checkpoint row uploads advance. Not the scheduled pull's (``recruit``): a push of newer ids
#: must not move the pull's resume point past rows the pull never received.
DEFAULT_UPLOAD_STREAM = "recruit_upload"
DEFAULT_CACHE_TARGET = "recruit"
#: Request metadata key naming an upload (the push command sends one); else the server picks one.
UPLOAD_ID_KEY = "x-upload-id"
#: Room for the largest chunk a sender may use (the AI server keeps messages under 4 MiB).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_UPLOAD_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_CANONICAL_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

ConnectionFactory = Callable[[], psycopg.Connection]


def dsn_connector(dsn: str) -> ConnectionFactory:
    """Connections to ``dsn`` in autocommit mode (every write is an explicit transaction)."""

    def connect() -> psycopg.Connection:
        return psycopg.connect(dsn, autocommit=True)

    return connect


def airflow_connector(postgres_conn_id: str) -> ConnectionFactory:
    """Connections from an Airflow connection through ``PostgresHook``, in autocommit mode."""
    from airflow_embedding_provider.hooks.postgres import psycopg3_connection

    return lambda: psycopg3_connection(postgres_conn_id)


@dataclass(frozen=True)
class UploadSettings:
    """How uploads are stored.

    :param dimension: the configured vector dimension; other lengths go to the DLQ.
    :param sub_batch_size: rows a transaction.
    :param db_connections: writers (connections) an upload uses; each upload opens its own.
    :param prefetch_depth: decoded chunks held ahead of the writers; with the writers' queue this
        bounds what an upload holds in memory.
    :param max_concurrent_uploads: uploads served at once; more are refused with RESOURCE_EXHAUSTED,
        so at most ``max_concurrent_uploads * db_connections`` connections are open.
    :param stream_name: the checkpoint row uploads advance.
    :param cache_target: the cache the outbox marks stale when an upload changes rows.
    """

    dimension: int = DEFAULT_DIMENSION
    sub_batch_size: int = DEFAULT_SUB_BATCH_SIZE
    db_connections: int = 2
    prefetch_depth: int = 4
    max_concurrent_uploads: int = 4
    stream_name: str = DEFAULT_UPLOAD_STREAM
    cache_target: str = DEFAULT_CACHE_TARGET

    def __post_init__(self) -> None:
        for name in ("sub_batch_size", "db_connections", "prefetch_depth", "max_concurrent_uploads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class _Progress:
    """What one upload handed to the writers: ``ingest_chunks`` writes every chunk it pulled before
    it re-raises a stream failure, so after an abort this is also what is committed."""

    def __init__(self) -> None:
        self.rows = 0
        self.chunks = 0
        self.last_id: str | None = None
        self.sync: bool = False
        self.max_delete_fraction = DEFAULT_MAX_DELETE_FRACTION
        #: With ``sync``: each valid id received -> the hash of its last row (digest.py).
        self.hashes: dict[str, int] = {}

    def first(self, message: RowChunkBytes) -> None:
        """Read the upload's options from its first message."""
        self.sync = message.sync
        if message.HasField("max_delete_fraction"):
            self.max_delete_fraction = message.max_delete_fraction

    def track(self, chunks: Iterable[WireChunk]) -> Iterator[WireChunk]:
        for chunk in chunks:
            self.rows += len(chunk)
            self.chunks += 1
            if self.sync:
                for i, raw in enumerate(chunk.ids):
                    if _CANONICAL_UUID.match(raw):
                        self.hashes[raw] = row_hash(
                            raw,
                            chunk.company_name[i],
                            chunk.exp_years[i],
                            chunk.english_level[i],
                            chunk.primary_keyword[i],
                            chunk.vectors[i],
                        )
            # The highest valid id: the position a resumed push starts after (``push --after``).
            ids = [i for i in chunk.ids if _CANONICAL_UUID.match(i)]
            if ids:
                top = max(ids)
                self.last_id = top if self.last_id is None else max(self.last_id, top)
            yield chunk

    def evidence(self, max_deletes: int) -> RangeSync:
        """The whole upload as a sync's evidence over the whole id range (storage/sync.py)."""
        ids = sorted(self.hashes)
        keys = b"".join(uuid.UUID(i).bytes for i in ids)
        return RangeSync(None, None, keys, np.array([self.hashes[i] for i in ids], dtype=np.int64), max_deletes)


def _decoded(requests: Iterable[RowChunkBytes], progress: _Progress) -> Iterator[WireChunk]:
    for n, message in enumerate(requests):
        if n == 0:
            progress.first(message)
        yield decode_chunk(message)


def describe(stats: IngestStats, upload_id: str) -> str:
    """The ``UploadResult.message``: stored, new, changed, unchanged and DLQ counts, and the position."""
    dlq = ""
    if stats.rows_dlq:
        reasons = ", ".join(f"{kind}: {n}" for kind, n in sorted(stats.dlq_by_reason.items()))
        dlq = f" ({reasons})"
    duplicates = f", {stats.duplicates} repeated ids (last occurrence kept)" if stats.duplicates else ""
    return (
        f"upload {upload_id}: {stats.rows_received} rows in {stats.chunks} chunks; stored {stats.rows_stored} "
        f"({stats.inserted} new, {stats.updated} changed, {stats.unchanged} unchanged){duplicates}; "
        f"{stats.rows_dlq} to the DLQ{dlq}; position {stats.last_processed_uuid or '-'}; "
        f"{stats.seconds:.1f} s, {stats.rows_per_second:.0f} rows/s"
    )


class UploadServicer:
    """Serves ``UploadEmbeddings``; each upload opens its own connections and closes them after.

    :param connect: opens one autocommit psycopg 3 connection.
    :param settings: dimension, batching and limits.
    """

    def __init__(self, connect: ConnectionFactory, settings: UploadSettings | None = None) -> None:
        self._connect = connect
        self.settings = settings or UploadSettings()
        self._slots = threading.BoundedSemaphore(self.settings.max_concurrent_uploads)
        self._lock = threading.Lock()
        self._active = 0

    @property
    def active_uploads(self) -> int:
        with self._lock:
            return self._active

    def prepare(self) -> None:
        """Create the schema once, before serving; raises ``SchemaMismatchError`` on a dimension change."""
        with self._connect() as conn:
            apply_schema(conn, self.settings.dimension)

    def UploadEmbeddings(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[RowChunkBytes], context: grpc.ServicerContext
    ) -> embedding_pb2.UploadResult:
        if not self._slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.settings.max_concurrent_uploads} uploads are in progress, the server's limit; retry later",
            )
        with self._lock:
            self._active += 1
        try:
            return self._upload(request_iterator, context)
        finally:
            with self._lock:
                self._active -= 1
            self._slots.release()

    def _upload(
        self, request_iterator: Iterator[RowChunkBytes], context: grpc.ServicerContext
    ) -> embedding_pb2.UploadResult:
        settings = self.settings
        peer = context.peer()
        upload_id = _upload_id(context)
        progress = _Progress()
        log.info("upload %s from %s: started", upload_id, peer)
        with ExitStack() as stack:
            try:
                conns = [stack.enter_context(self._connect()) for _ in range(settings.db_connections)]
            except (psycopg.Error, RuntimeError) as exc:
                log.error("upload %s from %s: cannot connect to PostgreSQL: %s", upload_id, peer, exc)
                context.abort(grpc.StatusCode.UNAVAILABLE, f"the upload server cannot reach PostgreSQL: {exc}")
            # One outbox entry per upload: concurrent uploads never wait on each other's outbox row.
            cache = CacheRequest(settings.cache_target, f"upload/{peer}/{upload_id}")
            writers = [
                ChunkWriter(c, dimension=settings.dimension, stream_name=settings.stream_name, cache_request=cache)
                for c in conns
            ]
            chunks = progress.track(prefetch(_decoded(request_iterator, progress), settings.prefetch_depth))
            try:
                stats = ingest_chunks(
                    chunks,
                    writers,
                    dimension=settings.dimension,
                    sub_batch_size=settings.sub_batch_size,
                    origin={"upload": upload_id, "peer": peer},
                )
            except grpc.RpcError:
                # The request stream ended abnormally: the client cancelled, its deadline passed or
                # the server stopped after its grace period. ingest_chunks has written what arrived.
                return self._aborted(upload_id, peer, progress)
            except Exception as exc:
                log.exception("upload %s from %s: failed after %d rows", upload_id, peer, progress.rows)
                return embedding_pb2.UploadResult(
                    success=False,
                    total_rows=progress.rows,
                    message=(
                        f"upload {upload_id}: failed after receiving {progress.rows} rows in {progress.chunks} "
                        f"chunks ({type(exc).__name__}: {str(exc).strip()[:500]}); committed sub-batches stay "
                        "committed, uploading again is idempotent"
                    ),
                )
            if not context.is_active():
                # gRPC may end the request iterator of a cancelled call as if the client had finished.
                return self._aborted(upload_id, peer, progress)
            guard = ""
            if progress.sync:
                guard = self._sync(writers[0], conns[0], progress, stats)
        message = describe(stats, upload_id) + guard
        log.info("%s (peer %s)", message, peer)
        # success: every row is stored; rejected rows are kept in the DLQ but make the upload fail,
        # so that the sender learns that part of its data needs fixing (SEED.md 11).
        return embedding_pb2.UploadResult(
            success=stats.rows_dlq == 0 and not stats.deletes_blocked,
            total_rows=stats.rows_received,
            message=message,
            deleted=stats.deleted,
            deletes_blocked=stats.deletes_blocked,
        )

    def _sync(self, writer: ChunkWriter, conn: psycopg.Connection, progress: _Progress, stats: IngestStats) -> str:
        """Delete the stored rows the upload did not have (the guard permitting); what to add to
        the answer's message."""
        stored = stored_count(conn, DEFAULT_TABLES)
        fraction = progress.max_delete_fraction
        result = writer.write(
            RowBatch.empty(self.settings.dimension), reconcile=progress.evidence(math.floor(fraction * stored))
        )
        stats.add(result)
        if result.deletes_blocked:
            return (
                f"; sync: the upload lacks {result.deletes_blocked} of the {stored} stored rows "
                f"({result.deletes_blocked / max(stored, 1):.1%}), above max_delete_fraction {fraction:g}: "
                "nothing was deleted, everything else is stored. If the source really lost these rows, push again "
                "with a higher --max-delete-fraction"
            )
        return f"; sync: deleted {result.deleted} rows the upload did not have"

    @staticmethod
    def _aborted(upload_id: str, peer: str, progress: _Progress) -> embedding_pb2.UploadResult:
        log.warning(
            "upload %s from %s: aborted by the client after %d rows in %d chunks, all committed; "
            "highest id %s. Upload again (idempotent), or push --after that id",
            upload_id,
            peer,
            progress.rows,
            progress.chunks,
            progress.last_id or "-",
        )
        # Nobody receives this answer: the call is over.
        return embedding_pb2.UploadResult(success=False, total_rows=progress.rows, message="aborted")


def _upload_id(context: grpc.ServicerContext) -> str:
    for key, value in context.invocation_metadata():
        if key == UPLOAD_ID_KEY and isinstance(value, str) and _UPLOAD_ID.match(value):
            return value
    return uuid.uuid4().hex[:12]


def build_server(
    servicer: UploadServicer, *, host: str, port: int, security: ServerSecurity | None = None
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A not yet started server bound to ``host:port`` (0 = a free port); returns it, the port and
    its health servicer.

    :param security: TLS, mutual TLS and bearer-token settings; ``None`` serves plaintext without a token.
    """
    limit = servicer.settings.max_concurrent_uploads
    server = new_server(
        # Spare threads beyond the upload limit answer health checks and refuse extra uploads.
        futures.ThreadPoolExecutor(max_workers=limit + 4, thread_name_prefix="upload-server"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ],
        maximum_concurrent_rpcs=limit + 64,
        security=security,
    )
    # Receive through the bytes view: wire-identical to RowChunk, vectors arrive as one bytes object.
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "UploadEmbeddings": grpc.stream_unary_rpc_method_handler(
                servicer.UploadEmbeddings,
                request_deserializer=RowChunkBytes.FromString,
                response_serializer=embedding_pb2.UploadResult.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    health_servicer = add_health(server, SERVICE_NAME)
    return server, bind_port(server, host, port, security), health_servicer


def serve(
    servicer: UploadServicer, *, host: str, port: int, grace: float = 60.0, security: ServerSecurity | None = None
) -> None:
    """Apply the schema, serve until SIGTERM or SIGINT, then drain in-flight uploads.

    On the signal the health status turns NOT_SERVING and new calls are refused; uploads in
    progress continue for up to ``grace`` seconds, after which they are cancelled (what they
    received is committed either way).

    :param security: TLS, mutual TLS and bearer-token settings; ``None`` serves plaintext without a token.
    """
    servicer.prepare()
    server, bound, health_servicer = build_server(servicer, host=host, port=port, security=security)
    server.start()
    settings = servicer.settings
    print(
        f"upload server listening on {host}:{bound} (dimension {settings.dimension}, "
        f"up to {settings.max_concurrent_uploads} uploads x {settings.db_connections} connections)",
        flush=True,
    )
    wait_for_stop_signal()
    health_servicer.enter_graceful_shutdown()
    active = servicer.active_uploads
    log.info("shutting down: draining %d upload(s) for up to %g s", active, grace)
    began = time.monotonic()
    server.stop(grace=grace).wait()
    log.info("stopped after %.1f s", time.monotonic() - began)
