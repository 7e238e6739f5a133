"""The AI side of the client-streaming pattern: stream a loaded ``.pkl`` to the upload server.

Chunks are sent as :class:`RowChunkBytes` (wire-identical to ``RowChunk``) from a generator that
gRPC pulls only as fast as the transport accepts them, so a slow server slows the push instead of
filling the pusher's memory.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import grpc

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset, load_dataset
from airflow_embedding_provider.hooks.grpc_channel import ChannelSettings
from airflow_embedding_provider.upload_server.service import UPLOAD_ID_KEY, UPLOAD_METHOD
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.contract import DEFAULT_CHUNK_SIZE, max_chunk_size
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes

#: Seconds between two redraws of the progress line.
PROGRESS_INTERVAL = 0.5


class UploadError(Exception):
    """The upload did not complete; the message is one line for the user."""


def dataset_chunks(dataset: EmbeddingDataset, chunk_size: int, *, after: str = "") -> Iterator[RowChunkBytes]:
    """The dataset's rows after ``after`` ('' = all) in id order, ``chunk_size`` rows a message.

    A boundary never separates copies of one id, so ``after`` a logged position resumes exactly.
    """
    limit = max_chunk_size(dataset.dimension)
    if not 1 <= chunk_size <= limit:
        raise ValueError(f"chunk size {chunk_size} is out of range 1..{limit} at dimension {dataset.dimension}")
    try:
        start = dataset.start_after(after)
    except ValueError:
        raise ValueError(f"--after {after[:64]!r} is not a UUID") from None
    # Checked above, before the first send: a generator would only fail inside the gRPC call.
    return dataset.chunks(start, len(dataset), chunk_size)


class PushProgress:
    """One line on a terminal, redrawn in place: rows sent of the total, rows a second, time left.

    Rows count as sent when gRPC takes their message for the transport, which it does only as
    fast as the server accepts them (flow control), so the rate is the upload's own.
    """

    def __init__(self, stream: TextIO, total: int, *, interval: float = PROGRESS_INTERVAL) -> None:
        self.stream = stream
        self.total = total
        self.interval = interval
        self.sent = 0
        self.started = time.monotonic()
        self._drawn = 0.0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.sent / elapsed
        share = self.sent / self.total if self.total else 1.0
        left = (self.total - self.sent) / rate if rate > 0 else None
        eta = "--:--" if left is None else time.strftime("%H:%M:%S", time.gmtime(left))
        return f"sent {self.sent:,} of {self.total:,} rows ({share:.0%}), {rate:,.0f} rows/s, {eta} left"

    def advance(self, rows: int) -> None:
        self.sent += rows
        now = time.monotonic()
        if now - self._drawn >= self.interval:
            self._drawn = now
            self.stream.write("\r\x1b[K" + self.line())  # back to the line's start, clear it
            self.stream.flush()

    def finish(self) -> None:
        """The last state, then a new line so that the result prints below it."""
        self.stream.write("\r\x1b[K" + self.line() + "\n")
        self.stream.flush()

    def watch(self, chunks: Iterator[RowChunkBytes]) -> Iterator[RowChunkBytes]:
        for chunk in chunks:
            yield chunk
            # Resumed when gRPC asks for the next message: this one is on its way.
            self.advance(len(chunk.rows))


def upload(
    target: str | ChannelSettings,
    chunks: Iterator[RowChunkBytes],
    *,
    upload_id: str | None = None,
    connect_timeout: float = 10.0,
    timeout: float | None = None,
) -> embedding_pb2.UploadResult:
    """One ``UploadEmbeddings`` call; raises :class:`UploadError` when it does not complete.

    :param target: ``host:port`` of the upload server, or :class:`ChannelSettings` for TLS, mutual
        TLS and a bearer token (the same settings the hooks use).
    :param upload_id: names the upload in the server's logs, DLQ origins and outbox.
    :param connect_timeout: seconds to wait for the server to accept a connection.
    :param timeout: deadline of the whole call in seconds; none by default (uploads can be large).
    """
    settings = target if isinstance(target, ChannelSettings) else ChannelSettings(target=target)
    target = settings.target
    with settings.open_channel() as channel:
        ready = grpc.channel_ready_future(channel)
        try:
            ready.result(timeout=connect_timeout)
        except grpc.FutureTimeoutError:
            raise UploadError(f"cannot reach an upload server at {target} within {connect_timeout:g} s") from None
        finally:
            ready.cancel()
        call = channel.stream_unary(
            UPLOAD_METHOD,
            request_serializer=RowChunkBytes.SerializeToString,
            response_deserializer=embedding_pb2.UploadResult.FromString,
        )
        metadata = [(UPLOAD_ID_KEY, upload_id or uuid.uuid4().hex[:12]), *settings.metadata()]
        try:
            result: embedding_pb2.UploadResult = call(chunks, metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            name = code.name if code is not None else "ERROR"
            raise UploadError(f"upload to {target} failed with {name}: {details}") from None
    return result


def sync_first(chunks: Iterator[RowChunkBytes], max_delete_fraction: float | None = None) -> Iterator[RowChunkBytes]:
    """``chunks`` with the first marked ``sync``: the server makes the tables equal to the upload."""
    for n, message in enumerate(chunks):
        if n == 0:
            message.sync = True
            if max_delete_fraction is not None:
                message.max_delete_fraction = max_delete_fraction
        yield message


def push(
    pkl: str | Path,
    target: str | ChannelSettings,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    after: str = "",
    connect_timeout: float = 10.0,
    progress: TextIO | None = None,
    sync: bool = False,
    max_delete_fraction: float | None = None,
) -> embedding_pb2.UploadResult:
    """Load ``pkl`` and upload its rows (after ``after``) to ``target``; returns the server's answer.

    :param progress: a terminal to show :class:`PushProgress` on; none by default.
    :param sync: make the tables equal to the file: the server deletes stored rows the file does
        not have, unless more than ``max_delete_fraction`` of them (by default the server's,
        :data:`~airflow_embedding_provider.storage.sync.DEFAULT_MAX_DELETE_FRACTION`).
    """
    if sync and after:
        raise ValueError("--sync needs the whole file: it cannot be combined with --after")
    if max_delete_fraction is not None and not 0 <= max_delete_fraction <= 1:
        raise ValueError(f"--max-delete-fraction must be between 0 and 1, got {max_delete_fraction:g}")
    dataset = load_dataset(pkl)
    chunks = dataset_chunks(dataset, chunk_size, after=after)
    if sync:
        chunks = sync_first(chunks, max_delete_fraction)
    upload_id = f"push-{uuid.uuid4().hex[:12]}"
    if progress is None:
        return upload(target, chunks, upload_id=upload_id, connect_timeout=connect_timeout)
    meter = PushProgress(progress, len(dataset) - dataset.start_after(after))
    try:
        return upload(target, meter.watch(chunks), upload_id=upload_id, connect_timeout=connect_timeout)
    finally:
        meter.finish()
