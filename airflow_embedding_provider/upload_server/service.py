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

import contextlib
import dataclasses
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent import futures
from contextlib import ExitStack
from dataclasses import dataclass

import grpc
import numpy as np
import psycopg
from grpc_health.v1 import health

from airflow_embedding_provider.digest import row_hash
from airflow_embedding_provider.grpc_server import (
    CallSlots,
    add_health,
    bind_port,
    new_server,
    wait_for_stop_signal,
)
from airflow_embedding_provider.pipeline import (
    DEFAULT_SUB_BATCH_SIZE,
    IdleTimeoutError,
    IngestStats,
    ingest_chunks,
    prefetch,
)
from airflow_embedding_provider.rows import CANONICAL_UUID, DEFAULT_DIMENSION, RowBatch
from airflow_embedding_provider.security import ServerSecurity
from airflow_embedding_provider.storage.outbox import DEFAULT_CACHE_TARGET, CacheRequest
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, apply_schema
from airflow_embedding_provider.storage.session import SessionTimeouts, explain_timeout
from airflow_embedding_provider.storage.sync import DEFAULT_MAX_DELETE_FRACTION, RangeSync, stored_count
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.storage.writer_budget import WriterBudget
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.codec import WireChunk, parse_chunk_lenient
from airflow_embedding_provider.wire.contract import EMBEDDING_SERVICE, KEEPALIVE_SECONDS, MAX_RECEIVE_MESSAGE_BYTES

log = logging.getLogger(__name__)

SERVICE_NAME = EMBEDDING_SERVICE
UPLOAD_METHOD = f"/{SERVICE_NAME}/UploadEmbeddings"
#: The checkpoint row uploads advance. Not the scheduled pull's (``recruit``): a push of newer ids
#: must not move the pull's resume point past rows the pull never received.
DEFAULT_UPLOAD_STREAM = "recruit_upload"
#: Seconds an upload may stay silent between messages (``--idle-timeout``).
DEFAULT_IDLE_TIMEOUT = 60.0
#: Seconds SIGTERM lets in-flight uploads finish before they are cancelled (``--grace``).
DEFAULT_GRACE = 60.0
#: Request metadata key naming an upload (the push command sends one); else the server picks one.
UPLOAD_ID_KEY = "x-upload-id"
_UPLOAD_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

ConnectionFactory = Callable[[], psycopg.Connection]


def dsn_connector(dsn: str, timeouts: SessionTimeouts | None = None) -> ConnectionFactory:
    """Connections to ``dsn`` in autocommit mode (every write is an explicit transaction), with
    ``statement_timeout`` and ``lock_timeout`` set (:class:`SessionTimeouts`, from the environment
    by default)."""
    limits = timeouts or SessionTimeouts.from_env()

    def connect() -> psycopg.Connection:
        conn = psycopg.connect(dsn, autocommit=True)
        try:
            limits.apply(conn)
        except BaseException:
            conn.close()
            raise
        return conn

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
    :param db_writer_budget: the most writers of all ingest tasks and uploads on the database at
        once (storage/writer_budget.py); an upload writes on its share, on one more connection that
        holds its place. 0: no budget.
    :param prefetch_depth: decoded chunks held ahead of the writers; with the writers' queue this
        bounds what an upload holds in memory.
    :param max_concurrent_uploads: uploads served at once; more are refused with RESOURCE_EXHAUSTED,
        so at most ``max_concurrent_uploads * db_connections`` connections are open.
    :param stream_name: the checkpoint row uploads advance.
    :param cache_target: the cache the outbox marks stale when an upload changes rows.
    :param idle_timeout: seconds an upload may send nothing while the server waits for its next
        message; then it ends with DEADLINE_EXCEEDED (what arrived is committed), so that a client
        that opens an upload and goes quiet cannot hold a slot and its connections for ever.
    :param keepalive: seconds between the server's HTTP/2 pings on a quiet connection; a peer
        that stops answering (a dead host, a cut network) is dropped about 10 s after a ping.
    """

    dimension: int = DEFAULT_DIMENSION
    sub_batch_size: int = DEFAULT_SUB_BATCH_SIZE
    db_connections: int = 2
    db_writer_budget: int = 0
    prefetch_depth: int = 4
    max_concurrent_uploads: int = 4
    stream_name: str = DEFAULT_UPLOAD_STREAM
    cache_target: str = DEFAULT_CACHE_TARGET
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    keepalive: float = KEEPALIVE_SECONDS

    def __post_init__(self) -> None:
        for name in ("sub_batch_size", "db_connections", "prefetch_depth", "max_concurrent_uploads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.db_writer_budget < 0:
            raise ValueError("db_writer_budget must be at least 1 writer (or 0 for none)")
        for name in ("idle_timeout", "keepalive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds")


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
        #: With ``sync``: what the sync did, for the answer's message.
        self.guard = ""

    def first(self, chunk: WireChunk) -> None:
        """Read the upload's options from its first message."""
        self.sync = chunk.sync
        if chunk.max_delete_fraction is not None:
            self.max_delete_fraction = chunk.max_delete_fraction

    def track(self, chunks: Iterable[WireChunk]) -> Generator[WireChunk, None, None]:
        for chunk in chunks:
            if self.chunks == 0:
                self.first(chunk)
            self.rows += len(chunk)
            self.chunks += 1
            if self.sync:
                for i, raw in enumerate(chunk.ids):
                    if CANONICAL_UUID.fullmatch(raw):
                        self.hashes[raw] = row_hash(
                            raw,
                            chunk.company_name[i],
                            chunk.exp_years[i],
                            chunk.english_level[i],
                            chunk.primary_keyword[i],
                            chunk.vectors[i],
                        )
            # The highest valid id: the position a resumed push starts after (``push --after``).
            ids = [i for i in chunk.ids if CANONICAL_UUID.fullmatch(i)]
            if ids:
                top = max(ids)
                self.last_id = top if self.last_id is None else max(self.last_id, top)
            # A pusher's row hashes are not taken on trust: stored hashes decide what a later range
            # sync with the AI server skips, so the rows are hashed here (storage/writer.py).
            yield dataclasses.replace(chunk, row_hashes=None) if chunk.row_hashes is not None else chunk

    def evidence(self, max_deletes: int) -> RangeSync:
        """The whole upload as a sync's evidence over the whole id range (storage/sync.py)."""
        ids = sorted(self.hashes)
        keys = b"".join(uuid.UUID(i).bytes for i in ids)
        return RangeSync(None, None, keys, np.array([self.hashes[i] for i in ids], dtype=np.int64), max_deletes)


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
        self._slots = CallSlots(self.settings.max_concurrent_uploads, what="uploads", option="--max-concurrent-uploads")

    @property
    def active_uploads(self) -> int:
        return self._slots.active

    def prepare(self) -> None:
        """Create the schema once, before serving; raises ``SchemaMismatchError`` on a dimension change."""
        with self._connect() as conn:
            apply_schema(conn, self.settings.dimension)

    def UploadEmbeddings(  # noqa: N802 - gRPC method name
        self, request_iterator: Iterator[WireChunk], context: grpc.ServicerContext
    ) -> embedding_pb2.UploadResult:
        with self._slots.hold(context):
            return self._upload(request_iterator, context)

    def _upload(
        self, request_iterator: Iterator[WireChunk], context: grpc.ServicerContext
    ) -> embedding_pb2.UploadResult:
        settings = self.settings
        peer = context.peer()
        upload_id = _upload_id(context)
        progress = _Progress()
        log.info("upload %s from %s: started", upload_id, peer)
        chunks = progress.track(prefetch(request_iterator, settings.prefetch_depth, idle_timeout=settings.idle_timeout))
        try:
            with contextlib.closing(chunks):
                # The connections open with the first message: a client that opens an upload and
                # sends nothing holds no database connection while the idle timeout runs.
                first = next(chunks, None)
                stats = self._ingest(_resumed(first, chunks), context, upload_id, peer, progress)
        except grpc.RpcError:
            # The request stream ended abnormally: the client cancelled, its deadline passed or
            # the server stopped after its grace period. ingest_chunks has written what arrived.
            return self._aborted(upload_id, peer, progress)
        except IdleTimeoutError as exc:
            log.warning(
                "upload %s from %s: %s after %d rows in %d chunks (all committed); closing it",
                upload_id,
                peer,
                exc,
                progress.rows,
                progress.chunks,
            )
            context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"upload {upload_id}: {exc} (the server's --idle-timeout); the {progress.rows} rows received "
                f"are committed, highest id {progress.last_id or '-'}: upload again (idempotent) or push --after it",
            )
        except _UploadFailedError as exc:
            return exc.result
        if not context.is_active():
            # gRPC may end the request iterator of a cancelled call as if the client had finished.
            return self._aborted(upload_id, peer, progress)
        message = describe(stats, upload_id) + progress.guard
        log.info("%s (peer %s)", message, peer)
        # success: every row is stored; rejected rows are kept in the DLQ but make the upload fail,
        # so that the sender learns that part of its data needs fixing (docs/design.md §11).
        return embedding_pb2.UploadResult(
            success=stats.rows_dlq == 0 and not stats.deletes_blocked,
            total_rows=stats.rows_received,
            message=message,
            rows_rejected=stats.rows_dlq,
            rejected_by_kind=dict(stats.dlq_by_reason),
            deleted=stats.deleted,
            deletes_blocked=stats.deletes_blocked,
        )

    def _ingest(
        self,
        chunks: Iterator[WireChunk],
        context: grpc.ServicerContext,
        upload_id: str,
        peer: str,
        progress: _Progress,
    ) -> IngestStats:
        settings = self.settings
        with ExitStack() as stack:
            try:
                conns = [stack.enter_context(self._connect()) for _ in range(settings.db_connections)]
                place = (
                    stack.enter_context(
                        WriterBudget(
                            stack.enter_context(self._connect()),
                            budget=settings.db_writer_budget,
                            writers=settings.db_connections,
                        )
                    )
                    if settings.db_writer_budget
                    else None
                )
            except (psycopg.Error, RuntimeError) as exc:
                log.error("upload %s from %s: cannot connect to PostgreSQL: %s", upload_id, peer, exc)
                context.abort(grpc.StatusCode.UNAVAILABLE, f"the upload server cannot reach PostgreSQL: {exc}")
            # One outbox entry per upload: concurrent uploads never wait on each other's outbox row.
            cache = CacheRequest(settings.cache_target, f"upload/{peer}/{upload_id}")
            writers = [
                ChunkWriter(c, dimension=settings.dimension, stream_name=settings.stream_name, cache_request=cache)
                for c in conns
            ]
            try:
                stats = ingest_chunks(
                    chunks,
                    writers,
                    dimension=settings.dimension,
                    sub_batch_size=settings.sub_batch_size,
                    origin={"upload": upload_id, "peer": peer},
                    writer_share=place.share if place is not None else None,
                )
            except (grpc.RpcError, IdleTimeoutError):
                raise
            except Exception as exc:
                log.exception("upload %s from %s: failed after %d rows", upload_id, peer, progress.rows)
                reason = explain_timeout(exc) or exc
                raise _UploadFailedError(
                    embedding_pb2.UploadResult(
                        success=False,
                        total_rows=progress.rows,
                        message=(
                            f"upload {upload_id}: failed after receiving {progress.rows} rows in {progress.chunks} "
                            f"chunks ({type(reason).__name__}: {str(reason).strip()[:800]}); committed sub-batches stay "
                            "committed, uploading again is idempotent"
                        ),
                    )
                ) from exc
            if progress.sync and context.is_active():
                progress.guard = self._sync(writers[0], conns[0], progress, stats)
            return stats

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


class _UploadFailedError(Exception):
    """Carries the answer of an upload that failed for a reason other than its stream."""

    def __init__(self, result: embedding_pb2.UploadResult) -> None:
        super().__init__(result.message)
        self.result = result


def _resumed(first: WireChunk | None, rest: Iterator[WireChunk]) -> Iterator[WireChunk]:
    """``first`` (already pulled to see that the upload sends something), then ``rest``."""
    if first is None:
        return
    yield first
    yield from rest


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
        options=[("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES)],
        maximum_concurrent_rpcs=limit + 64,
        security=security,
        keepalive=servicer.settings.keepalive,
    )
    # Receive through the bytes view: wire-identical to RowChunk, vectors arrive as one bytes object.
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "UploadEmbeddings": grpc.stream_unary_rpc_method_handler(
                servicer.UploadEmbeddings,
                # Text that is not UTF-8 costs its row, not the upload (codec.parse_chunk_lenient).
                request_deserializer=parse_chunk_lenient,
                response_serializer=embedding_pb2.UploadResult.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    health_servicer = add_health(server, SERVICE_NAME)
    return server, bind_port(server, host, port, security), health_servicer


def serve(
    servicer: UploadServicer,
    *,
    host: str,
    port: int,
    grace: float = DEFAULT_GRACE,
    security: ServerSecurity | None = None,
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
