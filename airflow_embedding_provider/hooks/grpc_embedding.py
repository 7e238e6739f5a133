"""``GrpcEmbeddingHook``: talks to the AI server's ``EmbeddingStreamService``."""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from typing import Any, cast

import grpc

from airflow_embedding_provider.digest import HASH_VERSION, Hashes, RangeDigest, unpack_hashes
from airflow_embedding_provider.hooks.grpc_base import GrpcServiceHook
from airflow_embedding_provider.partitions import Partition
from airflow_embedding_provider.rows import canonical_uuid_or_none
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.codec import WireChunk, decode_chunk
from airflow_embedding_provider.wire.contract import AI_SERVER_PORT as DEFAULT_PORT
from airflow_embedding_provider.wire.contract import EMBEDDING_SERVICE
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes

RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
#: Rows :meth:`GrpcEmbeddingHook.fetch_row` asks for: the row itself plus a few, in case the server
#: holds the id twice.
FETCH_CHUNK_SIZE = 8
#: Rejected rows a ``ReportRejects`` call: well under the message limit whatever the messages hold.
REPORT_ROWS_PER_CALL = 2000
#: Ids a ``GetEmbeddings`` request names at most (16 bytes each: 1.6 MB, under gRPC's 4 MiB).
ONLY_IDS_PER_REQUEST = 100_000
#: Codes of a stream that broke on the way (server gone, reset, overloaded), not of a bad request.
STREAM_CUT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
    }
)


def _stream_cut(exc: Exception) -> bool:
    if isinstance(exc, ConnectionError):
        return True
    code = exc.code() if isinstance(exc, grpc.Call) else None
    return code in STREAM_CUT_CODES


def _describe(exc: Exception) -> str:
    if isinstance(exc, grpc.Call):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


def _resume_after(position: str | None, chunk: WireChunk) -> str | None:
    """The resume point after ``chunk``: its highest UUID id (ids arrive in order)."""
    best = position
    for raw in reversed(chunk.ids):
        candidate = canonical_uuid_or_none(raw)
        if candidate is None:
            continue  # rows with invalid ids come first and have no place in the order
        return candidate if best is None or candidate > best else best
    return best


class GrpcEmbeddingHook(GrpcServiceHook):
    """Streams rows from the AI server (``EmbeddingStreamService``).

    :param grpc_conn_id: an ``embedding_grpc`` connection (see :class:`GrpcServiceHook`).
    """

    default_conn_name = "embedding_grpc_default"
    hook_name = "Embedding gRPC"
    default_port = DEFAULT_PORT
    service_name = EMBEDDING_SERVICE

    def stream_chunks(
        self,
        *,
        after: str | None,
        chunk_size: int,
        until: str | None = None,
        reconnects: int = 5,
        timeout: float | None = None,
        only_ids: bytes | None = None,
    ) -> Iterator[WireChunk]:
        """``GetEmbeddings``: decoded chunks of the rows after ``after`` up to ``until`` inclusive.

        With ``only_ids`` (16-byte keys, concatenated, ascending) only those rows of the range,
        asked for in requests of at most :data:`ONLY_IDS_PER_REQUEST` ids.

        When the stream breaks (server gone, connection reset, deadline), reconnect with
        exponential backoff and jitter and continue right after the last row handed out, up to
        ``reconnects`` times in a row; the count starts again once a chunk arrives. Then the error
        is raised, and the task's retry resumes from the stored progress.

        :param timeout: a deadline for each stream call, in seconds; none by default, since a large
            load may stream for long. A dead peer is still noticed through keepalive.
        """
        if only_ids is not None:
            step = 16 * ONLY_IDS_PER_REQUEST
            for begin in range(0, len(only_ids), step):
                page = only_ids[begin : begin + step]
                yield from self._stream_with_reconnects(after, until, chunk_size, reconnects, timeout, page)
            return
        yield from self._stream_with_reconnects(after, until, chunk_size, reconnects, timeout, b"")

    def fetch_row(self, row_id: str) -> WireChunk | None:
        """The AI server's current version of ``row_id`` through ``GetEmbeddings``, as a one-row
        chunk, or ``None`` when the server does not hold it (the DLQ replay's ``refetch``).

        Streams strictly after the id just below ``row_id`` and stops at the first greater id; when the
        server holds the id more than once its last occurrence wins, as in an ingest (docs/design.md §10.4).
        """
        target = uuid.UUID(row_id)
        after = str(uuid.UUID(int=target.int - 1)) if target.int else None
        found: WireChunk | None = None
        # Closed on the early return: that cancels the rest of the stream on the server.
        stream = cast("Generator[WireChunk, None, None]", self.stream_chunks(after=after, chunk_size=FETCH_CHUNK_SIZE))
        with contextlib.closing(stream) as chunks:
            for chunk in chunks:
                for i, raw in enumerate(chunk.ids):
                    try:
                        current = uuid.UUID(raw)
                    except ValueError:
                        continue  # rows without a UUID come first in a stream from the beginning
                    if current == target:
                        found = chunk.slice(i, i + 1)
                    elif current > target:
                        return found
        return found

    def _stream_with_reconnects(
        self,
        after: str | None,
        until: str | None,
        chunk_size: int,
        reconnects: int,
        timeout: float | None,
        only_ids: bytes,
    ) -> Iterator[WireChunk]:
        position, failures = after, 0
        while True:
            try:
                for chunk in self._stream_once(
                    after=position, until=until, chunk_size=chunk_size, timeout=timeout, only_ids=only_ids
                ):
                    failures = 0
                    position = _resume_after(position, chunk)
                    yield chunk
                return
            except (grpc.RpcError, ConnectionError) as exc:
                # tenacity's context manager would swallow GeneratorExit here, so the loop is ours.
                if self.closed or not _stream_cut(exc) or failures >= reconnects:
                    raise
                failures += 1
                delay = min(RECONNECT_MAX_SECONDS, RECONNECT_FIRST_SECONDS * 2 ** (failures - 1))
                delay *= random.uniform(0.5, 1.0)
                self.log.warning(
                    "stream from %s broke (%s); reconnect %d/%d in %.1f s, resuming after %s",
                    self.settings.target,
                    _describe(exc),
                    failures,
                    reconnects,
                    delay,
                    position or "the start",
                )
                time.sleep(delay)

    def _stream_once(
        self, *, after: str | None, until: str | None, chunk_size: int, timeout: float | None, only_ids: bytes = b""
    ) -> Iterator[WireChunk]:
        call = self._method("GetEmbeddings", embedding_pb2.StreamEmbeddingRequest, RowChunkBytes, stream=True)
        request = embedding_pb2.StreamEmbeddingRequest(
            last_processed_uuid=after or "", chunk_size=chunk_size, until_uuid=until or "", only_ids=only_ids
        )
        responses = call(request, timeout=timeout, metadata=self.settings.metadata())
        try:
            for message in responses:
                yield decode_chunk(message)
        finally:
            responses.cancel()

    def _method(self, name: str, request: Any, reply: Any, *, stream: bool = False) -> Any:
        """The callable of ``EmbeddingStreamService.<name>`` once the server is ready: unary, or
        with ``stream`` server-streaming; ``request``/``reply`` are the message types."""
        self.wait_until_ready()
        make = self.channel.unary_stream if stream else self.channel.unary_unary
        return make(
            f"/{EMBEDDING_SERVICE}/{name}",
            request_serializer=request.SerializeToString,
            response_deserializer=reply.FromString,
        )

    def plan_partitions(
        self, *, after: str | None, rows_per_partition: int, max_partitions: int
    ) -> tuple[list[Partition], int]:
        """``PlanPartitions``: contiguous id ranges of the rows after ``after``; and the row count."""
        call = self._method("PlanPartitions", embedding_pb2.PartitionPlanRequest, embedding_pb2.PartitionPlan)
        plan = call(
            embedding_pb2.PartitionPlanRequest(
                last_processed_uuid=after or "", rows_per_partition=rows_per_partition, max_partitions=max_partitions
            ),
            timeout=self.settings.timeout,
            metadata=self.settings.metadata(),
        )
        partitions = [
            Partition(index=p.index, after_uuid=p.after_uuid or None, until_uuid=p.until_uuid or None, rows=p.rows)
            for p in plan.partitions
        ]
        return partitions, int(plan.total_rows)

    def report_rejects(self, *, source: str, rows_received: int, rejects: Sequence[tuple[str, str, str]]) -> int:
        """``ReportRejects``: tell the AI server which rows (``(id, error_kind, message)``) went to
        the DLQ, a few thousand a call (at least one call, so a clean unit is reported too).
        Returns the rows the server recorded."""
        call = self._method("ReportRejects", embedding_pb2.RejectReport, embedding_pb2.RejectReportAck)
        recorded = 0
        for start in range(0, max(1, len(rejects)), REPORT_ROWS_PER_CALL):
            report = embedding_pb2.RejectReport(source=source, rows_received=rows_received)
            for row_id, kind, message in rejects[start : start + REPORT_ROWS_PER_CALL]:
                # Text that cannot travel (a lone surrogate) must not lose the report.
                report.rows.add(id=_sendable(row_id), error_kind=kind, message=_sendable(message[:500]))
            ack = call(report, timeout=self.settings.timeout, metadata=self.settings.metadata())
            recorded += int(ack.rows_recorded)
        return recorded

    def server_status(self) -> embedding_pb2.ServerStatus:
        """``GetServerStatus``: rows, defective rows by column and reason, rejects reported so far."""
        call = self._method("GetServerStatus", embedding_pb2.ServerStatusRequest, embedding_pb2.ServerStatus)
        status: embedding_pb2.ServerStatus = call(
            embedding_pb2.ServerStatusRequest(), timeout=self.settings.timeout, metadata=self.settings.metadata()
        )
        return status

    def range_digests(self, ranges: list[tuple[str | None, str | None]]) -> list[RangeDigest]:
        """``RangeDigests``: the source's count and digest of each ``(after, until)`` range."""
        call = self._method("RangeDigests", embedding_pb2.RangeDigestRequest, embedding_pb2.RangeDigestReply)
        request = embedding_pb2.RangeDigestRequest(
            ranges=[embedding_pb2.DigestRange(after_uuid=a or "", until_uuid=u or "") for a, u in ranges]
        )
        reply = call(request, timeout=self.settings.timeout, metadata=self.settings.metadata())
        _check_hash_version(reply.hash_version, self.settings.target)
        return [RangeDigest(int(r.rows), int(r.digest)) for r in reply.ranges]

    def list_range(self, after: str | None, until: str | None) -> tuple[bytes, Hashes]:
        """``ListRangeDigests``: the 16-byte keys (concatenated, ascending) and row hashes of
        every row of the source in ``(after, until]``."""
        call = self._method(
            "ListRangeDigests", embedding_pb2.RangeDigestListRequest, embedding_pb2.RangeDigestPage, stream=True
        )
        request = embedding_pb2.RangeDigestListRequest(
            range=embedding_pb2.DigestRange(after_uuid=after or "", until_uuid=until or "")
        )
        keys: list[bytes] = []
        hashes: list[bytes] = []
        for page in call(request, timeout=self.settings.timeout, metadata=self.settings.metadata()):
            if len(page.ids) != 2 * len(page.row_hashes):
                raise ValueError(
                    f"{self.settings.target} sent {len(page.ids)} bytes of ids for {len(page.row_hashes)} of hashes"
                )
            keys.append(page.ids)
            hashes.append(page.row_hashes)
        return b"".join(keys), unpack_hashes(b"".join(hashes))


def _sendable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_hash_version(version: str, target: str) -> None:
    if version != HASH_VERSION:
        raise ValueError(
            f"the AI server at {target} hashes rows as {version or 'nothing'!r}, this provider as {HASH_VERSION!r}: "
            "upgrade the older of the two"
        )
