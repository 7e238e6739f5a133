"""The DLQ replay: re-validate and re-store dead-lettered rows (docs/design.md §7.3 (4)).

A replay runs after the cause of a failure was fixed: a new vector dimension configured, a
corrected row on the AI server, a constraint relaxed. Each pending entry in scope is turned back
into the row it recorded (or re-fetched from the AI server), validated against the current
configuration and upserted through the same :class:`ChunkWriter` as an ingest, beside which
(``pipeline.py``) this module stands; ``operators/dlq_replay.py`` runs it as a task.

A payload is the row as it was when it failed, so it may be older than what is stored now: when
the AI server sent a corrected version of the row after the failure, an ingest stored that one.
A row replayed from its payload is therefore written only when its id is not stored, or stored by
a write no later than the entry's ``created_at``; otherwise the entry is settled as
``superseded`` and the stored row stays. A re-fetched row is the server's current version and is
written as usual.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from airflow_embedding_provider.rows import RowBatch
from airflow_embedding_provider.storage.dlq import (
    ALL_PENDING,
    DlqEntry,
    DlqScope,
    Failure,
    PayloadError,
    mark_failed,
    mark_resolved,
    mark_superseded,
    payload_to_chunk,
    select_pending,
    stored_versions,
    transaction_time,
)
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, TableNames
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.validation import validate_chunk
from airflow_embedding_provider.wire.codec import WireChunk

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 500
#: Given a row id, the AI server's current version of that row as a one-row chunk, or ``None``.
Refetch = Callable[[str], WireChunk | None]


@dataclass
class ReplayStats:
    """Counts of one replay; ``by_reason`` counts still-failing entries by their latest reason,
    ``resolved_by_reason`` resolved entries by the reason they had been dead-lettered for.
    ``selected`` = ``resolved`` + ``superseded`` + ``still_failing``; ``superseded`` entries were
    not written because a newer version of their row is stored."""

    selected: int = 0
    resolved: int = 0
    superseded: int = 0
    still_failing: int = 0
    refetched: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    resolved_by_reason: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "selected": self.selected,
            "resolved": self.resolved,
            "superseded": self.superseded,
            "still_failing": self.still_failing,
            "refetched": self.refetched,
            "inserted": self.inserted,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "by_reason": dict(self.by_reason),
            "resolved_by_reason": dict(self.resolved_by_reason),
        }


class _Batch:
    """One page of entries on its way through validation and the writer."""

    def __init__(self) -> None:
        self.good: list[tuple[DlqEntry, RowBatch]] = []
        self.failures: list[Failure] = []
        self.refetched = 0
        #: dlq_ids of the good entries whose row is the stored payload, not a re-fetched one.
        self.from_payload: set[int] = set()

    def fail(self, entry: DlqEntry, kind: str, message: str) -> None:
        self.failures.append((entry.dlq_id, kind, message))


def _revalidate(entries: Iterable[DlqEntry], dimension: int, refetch: Refetch | None) -> _Batch:
    # One entry at a time: a rejection must be charged to its own entry, and DLQ volumes are small.
    out = _Batch()
    for entry in entries:
        chunk = refetch(entry.id) if refetch is not None and entry.id is not None else None
        refetched = chunk is not None
        source = "the AI server's current version"
        if chunk is None:
            source = "the stored payload"
            try:
                chunk = payload_to_chunk([entry.payload])
            except PayloadError as exc:
                out.fail(entry, "unreadable_payload", str(exc))
                continue
        else:
            out.refetched += 1
        batch, rejected = validate_chunk(chunk, dimension)
        if rejected:
            out.fail(entry, rejected[0].kind, f"{rejected[0].message} (replayed from {source})")
        else:
            out.good.append((entry, batch))
            if not refetched:
                out.from_payload.add(entry.dlq_id)
    return out


#: Row id -> (``updated_at`` this replay wrote, ``created_at`` of the entry whose payload it wrote).
Written = dict[str, tuple[datetime, datetime]]


def _take_superseded(cur: psycopg.Cursor[Any], tables: TableNames, page: _Batch, written: Written) -> list[DlqEntry]:
    """Remove from ``page.good`` the payload rows whose id was written after their entry was
    dead-lettered, and return their entries: writing them would replace a newer version."""
    candidates = [(e, b) for e, b in page.good if e.dlq_id in page.from_payload]
    if not candidates:
        return []
    # Good rows have canonical UUID ids: an id that is not one never gets past validation.
    versions = stored_versions(cur, tables, sorted({b.ids[0] for _, b in candidates}))
    superseded: list[DlqEntry] = []
    for entry, batch in candidates:
        row_id = batch.ids[0]
        stored_at = versions.get(row_id)
        # No created_at (an entry inserted by hand): its age is unknown, so it is replayed as before.
        if stored_at is None or entry.created_at is None:
            continue
        # A row an earlier page of this replay wrote from a payload is as old as that payload,
        # not as its write: otherwise the older of two entries of one id would win across pages.
        ours = written.get(row_id)
        version = ours[1] if ours is not None and ours[0] == stored_at else stored_at
        # Strictly later: the same instant is the entry's own ingest transaction, whose order of
        # the two versions the timestamps cannot tell; that case is replayed as before.
        if version > entry.created_at:
            superseded.append(entry)
            log.info(
                "DLQ entry %d (id %s, dead-lettered %s) superseded: the stored row is a version of %s, "
                "later than the entry; its payload is not written",
                entry.dlq_id,
                row_id,
                entry.created_at.isoformat(sep=" "),
                version.isoformat(sep=" "),
            )
    dropped = {e.dlq_id for e in superseded}
    page.good = [(e, b) for e, b in page.good if e.dlq_id not in dropped]
    return superseded


def _remember(cur: psycopg.Cursor[Any], page: _Batch, stored: Sequence[DlqEntry], written: Written) -> None:
    """Record which version of each row this page wrote (see :func:`_take_superseded`)."""
    if not stored:
        return
    rows = {e.dlq_id: b for e, b in page.good}
    now = transaction_time(cur)
    # In page order, as the writer keeps the last occurrence of an id.
    for entry in stored:
        row_id = rows[entry.dlq_id].ids[0]
        if entry.dlq_id in page.from_payload and entry.created_at is not None:
            written[row_id] = (now, entry.created_at)
        else:
            # The server's current version (newer than any entry), or a payload of unknown age.
            written.pop(row_id, None)


def replay_dlq(
    conn: psycopg.Connection,
    writer: ChunkWriter,
    *,
    dimension: int,
    scope: DlqScope = ALL_PENDING,
    batch_size: int = DEFAULT_BATCH_SIZE,
    refetch: Refetch | None = None,
    delete_resolved: bool = False,
    tables: TableNames = DEFAULT_TABLES,
) -> ReplayStats:
    """Replay every pending entry in ``scope`` once, ``batch_size`` entries a transaction.

    In each transaction: the entries are locked, their rows validated and the good ones upserted by
    ``writer``, their entries marked resolved (or deleted), and the others' attempts and latest
    reason recorded. A crash therefore never stores a row and leaves its entry pending, nor the
    reverse. When the database refuses the page's rows, they are written one by one (each in a
    savepoint) so that only the refused rows stay in the queue, with the database's message.

    A row replayed from its stored payload whose id was written after the entry was created (a
    newer version arrived meanwhile) is not written; its entry is marked ``superseded`` (or deleted
    with ``delete_resolved``). Rows from ``refetch`` are the server's current version and are
    written regardless.
    """
    if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        # Inside a caller's transaction each page would only be a savepoint, committed by nobody.
        raise ValueError("replay_dlq needs a connection that is not inside a transaction")
    stats = ReplayStats()
    written: Written = {}
    after = 0
    while True:
        with conn.transaction(), conn.cursor() as cur:
            entries = select_pending(cur, tables, scope, after_dlq_id=after, limit=batch_size)
            if not entries:
                break
            after = entries[-1].dlq_id
            # A re-fetch talks to the AI server while the page's entries are locked; pages are
            # small and the lock only keeps a concurrent replay off these entries.
            page = _revalidate(entries, dimension, refetch)
            superseded = _take_superseded(cur, tables, page, written)
            stored = _write(writer, page, dimension, stats)
            _remember(cur, page, stored, written)
            mark_resolved(cur, tables, [e.dlq_id for e in stored], delete=delete_resolved)
            mark_superseded(cur, tables, [e.dlq_id for e in superseded], delete=delete_resolved)
            mark_failed(cur, tables, page.failures)
        stats.selected += len(entries)
        stats.refetched += page.refetched
        stats.resolved += len(stored)
        stats.superseded += len(superseded)
        stats.resolved_by_reason.update(e.error_kind or "unknown" for e in stored)
        stats.still_failing += len(page.failures)
        stats.by_reason.update(kind for _, kind, _ in page.failures)
    return stats


def _write(writer: ChunkWriter, page: _Batch, dimension: int, stats: ReplayStats) -> list[DlqEntry]:
    """Upsert the page's good rows; returns the entries whose rows are now stored."""
    if not page.good:
        return []
    # The writer isolates rows PostgreSQL refuses; they stay in their own entries, not new ones.
    result = writer.write(RowBatch.concat([b for _, b in page.good], dimension), dead_letter_refused=False)
    refused = {r.id: r for r in result.refused_rows}
    stored = []
    for entry, batch in page.good:
        rejection = refused.get(batch.ids[0])
        if rejection is None:
            stored.append(entry)
        else:
            page.fail(entry, rejection.kind, rejection.message)
    stats.inserted += result.inserted
    stats.updated += result.updated
    stats.unchanged += result.unchanged
    return stored
