"""The ingest path shared by every entry point: received chunks -> validate -> split -> upsert ->
checkpoint. The DAG's operator and the upload server both drive :func:`ingest_chunks`.

Chunks are re-split into sub-batches (docs/design.md §5) written by a bounded set of writers, one
database connection each, on their own threads; receiving and decoding go on meanwhile on a
prefetch thread, so blocking database work never stalls the stream (docs/design.md §9).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ALL_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from airflow_embedding_provider.rows import RowBatch
from airflow_embedding_provider.storage.checkpoint import PartitionKey
from airflow_embedding_provider.storage.sync import RangeSync
from airflow_embedding_provider.storage.writer import ChunkWriter, WriteResult
from airflow_embedding_provider.validation import Rejected, validate_chunk
from airflow_embedding_provider.wire.codec import WireChunk
from airflow_embedding_provider.wire.contract import max_chunk_size

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Rows a transaction. The seed suggests 50-100 rows but also "keep chunk size = batch size" and
#: to tune after load tests: a transaction costs about 11 round trips whatever its size, and at
#: 1000 rows a message and a transaction the engine ran 11 % faster than at 300 and 300, which in
#: turn was 1.2-1.6x faster than 100 (bench/RESULTS.md).
DEFAULT_SUB_BATCH_SIZE = 1000
#: Writers (database connections) of one ingest task: on 2 cores 4 did 1.4-1.7x the rows/s of one
#: (bench/RESULTS.md, the settings table); the writer budget shares them among tasks.
DEFAULT_DB_CONNECTIONS = 4


def default_chunk_size(dimension: int) -> int:
    """Rows a message the batch side asks for when not told: the sub-batch, as the seed has it
    ("keep chunk size = batch size"), or fewer when a message of that many vectors would not fit
    (:func:`~airflow_embedding_provider.wire.contract.max_chunk_size`)."""
    return min(DEFAULT_SUB_BATCH_SIZE, max_chunk_size(dimension))


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
    deleted: int = 0
    deletes_blocked: int = 0
    chunks: int = 0
    sub_batches: int = 0
    seconds: float = 0.0
    last_processed_uuid: str | None = None
    dlq_by_reason: Counter[str] = field(default_factory=Counter)
    #: ``(id or "", error_kind, message)`` of every row sent to the DLQ, to report to the AI server
    #: (docs/design.md §11); not part of :meth:`as_dict`, which must stay small.
    rejects: list[tuple[str, str, str]] = field(default_factory=list, repr=False)

    def reject(self, rows: Iterable[Rejected]) -> None:
        self.rejects.extend((r.id or "", r.kind, r.message) for r in rows)

    @property
    def rows_stored(self) -> int:
        return self.inserted + self.updated + self.unchanged

    @property
    def rows_per_second(self) -> float:
        return self.rows_received / self.seconds if self.seconds > 0 else 0.0

    def add(self, result: WriteResult) -> None:
        if result.refused:
            self.dlq_by_reason["database_rejected"] += result.refused
            self.reject(result.refused_rows)
        self.inserted += result.inserted
        self.updated += result.updated
        self.unchanged += result.unchanged
        self.duplicates += result.duplicates
        self.rows_dlq += result.rejected
        self.deleted += result.deleted
        self.deletes_blocked += result.deletes_blocked

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["rejects"]
        out["dlq_by_reason"] = dict(self.dlq_by_reason)
        out["rows_stored"] = self.rows_stored
        out["rows_per_second"] = round(self.rows_per_second, 1)
        out["seconds"] = round(self.seconds, 3)
        return out


class IdleTimeoutError(TimeoutError):
    """The source of :func:`prefetch` handed over nothing for ``idle_timeout`` seconds."""

    def __init__(self, idle_timeout: float) -> None:
        super().__init__(f"no message for {idle_timeout:g} s")
        self.idle_timeout = idle_timeout


def prefetch(items: Iterable[T], depth: int = 4, *, idle_timeout: float | None = None) -> Iterator[T]:
    """Pull ``items`` on a thread, at most ``depth`` ahead, so that receiving and decoding the next
    chunks overlaps the blocking database writes of the current ones.

    :param idle_timeout: raise :class:`IdleTimeoutError` when the consumer has waited this long
        for the next item (time the buffer is full does not count: then the consumer is busy).
        The thread stays blocked in the source until the caller ends it (a gRPC handler ends its
        call by returning), so the caller must end the source after this error.
    """
    buffer: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(item: Any) -> bool:
        """Put ``item`` unless the consumer has gone; ``False`` when it has."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def pump() -> None:
        try:
            for item in items:
                if not hand_over(item):
                    return
            hand_over(_DONE)
        except BaseException as exc:  # handed to the consumer, re-raised there
            hand_over(exc)
        finally:
            # Close the source here, on its own thread: a gRPC stream's generator cancels its call.
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=pump, name="chunk-prefetch", daemon=True)
    thread.start()
    idle = False
    try:
        while True:
            try:
                item = buffer.get(timeout=idle_timeout)
            except queue.Empty:
                idle = True
                raise IdleTimeoutError(idle_timeout or 0) from None
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # After an idle timeout the thread waits in the source, which only its caller can end.
        thread.join(timeout=0 if idle else 5)


class _Frontier:
    """Which sub-batches have committed, to claim only a contiguous prefix as progress.

    Sub-batches commit out of order on parallel writers. A transaction may claim, as its
    partition's committed position, the highest id of the contiguous run of committed sub-batches
    that it completes, or when an earlier sub-batch is still open, of the run committed so far;
    claiming less (when a neighbour commits at the same moment) is safe, and the stored position
    never moves back (storage/checkpoint.py). With several writers an earlier sub-batch is nearly
    always open: claiming only on completion, a partition's position moved in 2 of 474 sub-batches
    at 141,897 rows, and a retried task re-sent nearly its whole range.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_id: dict[int, str | None] = {}
        self._committed: set[int] = set()
        self._next = 0
        self._prefix_max: str | None = None

    def register(self, seq: int, last_id: str | None) -> None:
        with self._lock:
            self._last_id[seq] = last_id

    def claim(self, seq: int) -> str | None:
        """The position to record in ``seq``'s own transaction, or ``None`` for none yet."""
        with self._lock:
            s, best = self._next, self._prefix_max
            while s in self._committed or s == seq:
                best = _max_id(best, self._last_id[s])
                s += 1
            return best

    def committed(self, seq: int) -> None:
        with self._lock:
            self._committed.add(seq)
            while self._next in self._committed:
                self._committed.discard(self._next)
                self._prefix_max = _max_id(self._prefix_max, self._last_id.pop(self._next))
                self._next += 1

    @property
    def position(self) -> str | None:
        with self._lock:
            return self._prefix_max


class _IdOrder:
    """Writes of one id in the order the id arrived, across parallel writers (docs/design.md §10.4).

    Sub-batches commit out of order on parallel writers, so two copies of one id in two chunks
    could commit older-last: the newer copy's COPY wins the race, the older one's retries as an
    upsert and overwrites it. A sub-batch therefore waits, on its writer thread, for the earlier
    in-flight sub-batches that hold any of its ids. Only the main thread touches the map, and it
    holds only the ids of in-flight sub-batches (at most ``2 * writers`` of them).
    """

    def __init__(self) -> None:
        self._owner: dict[str, Future[WriteResult]] = {}
        self._ids: dict[Future[WriteResult], Sequence[str]] = {}

    def earlier(self, ids: Sequence[str]) -> list[Future[WriteResult]]:
        """The in-flight writes a sub-batch of ``ids`` must wait for."""
        owner = self._owner
        if not owner:
            return []
        return list({owner[i] for i in ids if i in owner})

    def claim(self, ids: Sequence[str], future: Future[WriteResult]) -> None:
        self._owner.update(dict.fromkeys(ids, future))
        self._ids[future] = ids

    def release(self, future: Future[WriteResult]) -> None:
        owner = self._owner
        for i in self._ids.pop(future, ()):
            if owner.get(i) is future:
                del owner[i]


class _WriterGate:
    """At most ``limit`` writes at once, a limit the main thread may change between chunks (a
    writer budget's share, storage/writer_budget.py). Writes wait here after the earlier writes of
    their ids (:class:`_IdOrder`), so a write holding the gate never waits on one queued behind it.
    """

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition()
        self._limit = max(1, limit)
        self._busy = 0
        self._closed = False

    def set_limit(self, limit: int) -> None:
        with self._cond:
            self._limit = max(1, limit)
            self._cond.notify_all()

    def close(self) -> None:
        """Writes still waiting give up (the ingest is being stopped)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._closed or self._busy < self._limit)
            if self._closed:
                raise RuntimeError("the ingest stopped before this sub-batch was written")
            self._busy += 1
        try:
            yield
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()


def _max_id(a: str | None, b: str | None) -> str | None:
    return b if a is None else a if b is None else max(a, b)


def _sub_batches(ids: Sequence[str], size: int) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` cuts of about ``size`` rows that never separate copies of one id: split
    over two transactions, the earlier copy could commit last, or a retry resuming "after" that id
    could skip the later copy (the AI server keeps such copies in one chunk for the same reason)."""
    start = 0
    while start < len(ids):
        stop = min(start + size, len(ids))
        while stop < len(ids) and ids[stop] == ids[stop - 1]:
            stop += 1
        yield start, stop
        start = stop


def _last_valid_id(batch: RowBatch, rejected: Sequence[Rejected]) -> str | None:
    """Highest id of a sub-batch (stored or rejected); invalid ids have no place in the order."""
    ids = [*batch.ids, *(r.id for r in rejected if r.id is not None)]
    return max(ids) if ids else None


def ingest_chunks(
    chunks: Iterable[WireChunk],
    writers: Sequence[ChunkWriter],
    *,
    dimension: int,
    sub_batch_size: int = DEFAULT_SUB_BATCH_SIZE,
    origin: Mapping[str, Any] | None = None,
    partition: PartitionKey | None = None,
    reconcile: RangeSync | None = None,
    writer_share: Callable[[], int] | None = None,
    log_every: int = 50,
) -> IngestStats:
    """Validate and store every chunk; returns the counts.

    :param writers: one per database connection; at most this many sub-batches are written at
        once, and at most twice as many are held in memory.
    :param sub_batch_size: rows a transaction. Each commits its rows, its rejected rows and the
        position it completes, so a crash keeps whole sub-batches only.
    :param partition: record progress on this partition (and the run's low watermark); without
        it the stream's checkpoint advances directly.
    :param reconcile: once everything is stored, delete the range's rows the source no longer
        has, in the transaction that marks the partition done (storage/sync.py).
    :param writer_share: how many of ``writers`` may write at once, asked before each chunk (a
        :meth:`~airflow_embedding_provider.storage.writer_budget.WriterBudget.share`); all of
        them without it.
    """
    if not writers:
        raise ValueError("ingest needs at least one writer")
    if sub_batch_size < 1:
        # A cut of 0 rows never advances: the loop below would run forever.
        raise ValueError(f"sub_batch_size must be at least 1, got {sub_batch_size}")
    stats = IngestStats()
    frontier = _Frontier()
    order = _IdOrder()
    idle: queue.Queue[ChunkWriter] = queue.Queue()
    for writer in writers:
        idle.put(writer)
    slots = threading.BoundedSemaphore(2 * len(writers))
    gate = _WriterGate(len(writers))
    began = time.monotonic()

    def store(
        seq: int, batch: RowBatch, rejected: list[Rejected], chunk_no: int, earlier: list[Future[WriteResult]]
    ) -> WriteResult:
        # Earlier writes of the same ids first. They were submitted before this one, so they run
        # already (the pool starts tasks in order): waiting here cannot deadlock. A failed one
        # fails the ingest through _collect; this write may then go ahead.
        wait(earlier)
        try:
            with gate.held():
                writer = idle.get()
                try:
                    result = writer.write(
                        batch,
                        rejected,
                        checkpoint=frontier.claim(seq),
                        partition=partition,
                        origin={**(origin or {}), "chunk": chunk_no},
                    )
                    frontier.committed(seq)
                    return result
                finally:
                    idle.put(writer)
        finally:
            slots.release()

    pending: set[Future[WriteResult]] = set()
    seq = 0
    source = iter(chunks)
    # The source is closed on the way out, whatever happens: a prefetch thread stops, a stream's
    # call is cancelled, before the caller closes the channel under them.
    with (
        ThreadPoolExecutor(max_workers=len(writers), thread_name_prefix="pgvector-writer") as pool,
        contextlib.closing(source) if isinstance(source, Generator) else contextlib.nullcontext(),
    ):
        try:
            for chunk_no in itertools.count():
                try:
                    chunk = next(source)
                except StopIteration:
                    break
                except Exception:
                    # The stream failed: finish writing what did arrive, so that the recorded
                    # progress covers it and a retry re-sends as little as possible. (Not when
                    # the task is being stopped, a BaseException: see below.)
                    _collect(pending, stats, block=True, order=order)
                    raise
                stats.rows_received += len(chunk)
                stats.chunks += 1
                if writer_share is not None:
                    gate.set_limit(writer_share())
                for start, stop in _sub_batches(chunk.ids, sub_batch_size):
                    batch, rejected = validate_chunk(chunk.slice(start, stop), dimension)
                    _report(chunk_no, rejected)
                    stats.dlq_by_reason.update(r.kind for r in rejected)
                    stats.reject(rejected)
                    frontier.register(seq, _last_valid_id(batch, rejected))
                    slots.acquire()
                    future = pool.submit(store, seq, batch, rejected, chunk_no, order.earlier(batch.ids))
                    order.claim(batch.ids, future)
                    pending.add(future)
                    seq += 1
                    pending = _collect(pending, stats, block=False, order=order)
                if log_every and stats.chunks % log_every == 0:
                    elapsed = max(time.monotonic() - began, 1e-9)
                    log.info(
                        "%d chunks, %d rows, %.0f rows/s, position %s",
                        stats.chunks,
                        stats.rows_received,
                        stats.rows_received / elapsed,
                        frontier.position,
                    )
            pending = _collect(pending, stats, block=True, order=order)
        except BaseException as exc:
            gate.close()
            for future in pending:
                future.cancel()
            if not isinstance(exc, Exception) and any(future.running() for future in pending):
                # The task is being stopped (its execution_timeout, SIGTERM), and leaving the pool
                # waits for running writes: cancel their statements, which may wait on a lock.
                for writer in writers:
                    with contextlib.suppress(Exception):
                        writer.cancel()
            raise
    stats.sub_batches = seq
    stats.last_processed_uuid = frontier.position
    if partition is not None or frontier.position is not None or reconcile is not None:
        # Everything is stored: record the final position (a claim can lag behind a neighbour
        # committing at the same moment) and mark the partition done, in one more transaction;
        # a range sync deletes in it, so that a crash keeps the deletions and the done mark, or neither.
        stats.add(
            writers[0].write(
                RowBatch.empty(dimension),
                checkpoint=frontier.position
                if reconcile is None
                else _max_id(frontier.position, reconcile.last_source_id),
                partition=partition,
                done=partition is not None,
                reconcile=reconcile,
            )
        )
    stats.seconds = time.monotonic() - began
    return stats


def _collect(
    pending: set[Future[WriteResult]], stats: IngestStats, *, block: bool, order: _IdOrder
) -> set[Future[WriteResult]]:
    """Fold finished writes into ``stats`` and return the unfinished; re-raises a writer's failure.
    ``block``: wait until all are finished."""
    if not pending:
        return pending
    done, rest = wait(pending, timeout=None if block else 0, return_when=ALL_COMPLETED)
    for future in done:
        order.release(future)
    for future in done:
        stats.add(future.result())
    return rest


def _report(chunk_no: int, rejected: Sequence[Rejected]) -> None:
    for kind, count in Counter(r.kind for r in rejected).items():
        # A dimension mismatch means the model upstream changed (docs/design.md §11): say it loudly.
        level = logging.ERROR if kind == "dimension_mismatch" else logging.WARNING
        example = next(r.message for r in rejected if r.kind == kind)
        log.log(level, "chunk %d: %d row(s) to the DLQ: %s (e.g. %s)", chunk_no, count, kind, example)
