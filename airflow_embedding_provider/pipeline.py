"""The ingest path shared by every entry point: received chunks -> validate -> split -> upsert ->
checkpoint. The DAG's operator and the upload server both drive :func:`ingest_chunks`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.validation import validate_chunk
from airflow_embedding_provider.wire.codec import WireChunk

log = logging.getLogger(__name__)
T = TypeVar("T")
_DONE = object()


@dataclass
class IngestStats:
    """Counts of one ingest; JSON-able through :meth:`as_dict` (XCom, logs, ``UploadResult``)."""

    rows_received: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0
    rows_dlq: int = 0
    chunks: int = 0
    seconds: float = 0.0
    last_processed_uuid: str | None = None
    dlq_by_reason: Counter[str] = field(default_factory=Counter)

    @property
    def rows_stored(self) -> int:
        return self.inserted + self.updated + self.unchanged

    @property
    def rows_per_second(self) -> float:
        return self.rows_received / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dlq_by_reason"] = dict(self.dlq_by_reason)
        out["rows_stored"] = self.rows_stored
        out["rows_per_second"] = round(self.rows_per_second, 1)
        out["seconds"] = round(self.seconds, 3)
        return out


def prefetch(items: Iterable[T], depth: int = 4) -> Iterator[T]:
    """Pull ``items`` on a thread, at most ``depth`` ahead, so that receiving and decoding the next
    chunks overlaps the blocking database write of the current one (SEED.md 5, 9)."""
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put(_DONE)
        except BaseException as exc:
            buffer.put(exc)

    thread = threading.Thread(target=pump, name="chunk-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def ingest_chunks(
    chunks: Iterable[WireChunk],
    writer: ChunkWriter,
    *,
    dimension: int,
    origin: Mapping[str, Any] | None = None,
    log_every: int = 50,
) -> IngestStats:
    """Validate and store every chunk, one transaction a chunk, advancing the checkpoint each time.

    The checkpoint of a chunk is the highest valid id in it (the server sends ids in order); rows
    with invalid ids cannot be placed in that order and never move it.
    """
    stats = IngestStats()
    began = time.monotonic()
    for number, chunk in enumerate(chunks):
        batch, rejected = validate_chunk(chunk, dimension)
        ids = list(batch.ids) + [r.id for r in rejected if r.id is not None]
        checkpoint = max(ids) if ids else None
        result = writer.write(batch, rejected, checkpoint=checkpoint, origin={**(origin or {}), "chunk": number})
        stats.rows_received += len(chunk)
        stats.inserted += result.inserted
        stats.updated += result.updated
        stats.unchanged += result.unchanged
        stats.duplicates += result.duplicates
        stats.rows_dlq += result.rejected
        stats.dlq_by_reason.update(r.kind for r in rejected)
        stats.chunks += 1
        if checkpoint is not None and (stats.last_processed_uuid is None or checkpoint > stats.last_processed_uuid):
            stats.last_processed_uuid = checkpoint
        if rejected:
            for kind, count in Counter(r.kind for r in rejected).items():
                level = logging.ERROR if kind == "dimension_mismatch" else logging.WARNING
                log.log(
                    level,
                    "chunk %d: %d row(s) to the DLQ: %s (e.g. %s)",
                    number,
                    count,
                    kind,
                    next(r.message for r in rejected if r.kind == kind),
                )
        if log_every and stats.chunks % log_every == 0:
            elapsed = time.monotonic() - began
            log.info(
                "%d chunks, %d rows, %.0f rows/s, checkpoint %s",
                stats.chunks,
                stats.rows_received,
                stats.rows_received / max(elapsed, 1e-9),
                stats.last_processed_uuid,
            )
    stats.seconds = time.monotonic() - began
    return stats
