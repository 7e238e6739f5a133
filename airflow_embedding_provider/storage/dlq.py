"""Every read and write of the dead letter queue: an ingest's rejected rows go in here
(:func:`dead_letter`, in the chunk's own transaction), a replay reads and settles them, a range sync
counts and settles them (docs/design.md §7.3 (4)).

An entry's ``payload`` is the row as it was received (see ``validation``): vectors as JSON numbers,
non-finite values as the strings ``"nan"``/``"inf"``/``"-inf"``, and byte strings that are not
whole float32 values as ``{"base64": ...}``. :func:`payload_to_chunk` turns it back into the
:class:`WireChunk` the row arrived in, so a replay validates and writes exactly what was received.

An entry's ``status`` is one of:

- ``pending``: not settled; what a replay selects.
- ``resolved``: a replay stored the entry's row.
- ``superseded``: a replay found the row's id stored by a write later than the entry (a newer
  version of the row arrived after this one was dead-lettered) and did not write the stale payload.
  ``error_kind`` and ``error_message`` keep the entry's last failure. A range sync also supersedes
  a pending entry whose row the source now has in another version (storage/sync.py).
- ``withdrawn``: a range sync found that the source no longer has the entry's id and deleted the
  id's stored row, if any (storage/sync.py); the entry is kept as a record and never replayed.

Settled entries are kept by default rather than deleted: the DLQ then stays an audit trail of what
failed, why and when it was settled, and a settled entry is never selected again, which is what
makes a replay idempotent. ``mark_resolved(..., delete=True)`` (and ``mark_superseded``) delete
instead, for deployments that prefer an empty queue. An ingest that rejects a settled entry's row
again makes it ``pending`` again (:func:`dead_letter`).
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from airflow_embedding_provider.digest import row_hash
from airflow_embedding_provider.rows import CellDefect
from airflow_embedding_provider.storage.schema import TableNames
from airflow_embedding_provider.validation import Rejected
from airflow_embedding_provider.wire.codec import FLOAT32_LE, WireChunk

PENDING = "pending"
RESOLVED = "resolved"
SUPERSEDED = "superseded"
WITHDRAWN = "withdrawn"


class PayloadError(ValueError):
    """A stored payload cannot be turned back into a received row (hand-edited, or truncated)."""


@dataclass(frozen=True)
class DlqScope:
    """Which pending entries a replay takes; the filters given are combined with AND, none = all.

    :param ids: row ids (canonical UUID strings); entries whose row had no valid id have none and
        are reachable only through the other filters.
    :param since: entries created at or after this instant.
    :param until: entries created before this instant (exclusive, so that consecutive windows
        never overlap). ``created_at`` is a ``timestamp`` written by ``now()`` in the database's
        time zone; aware datetimes are compared in that same zone by PostgreSQL.
    :param error_kinds: the ``error_kind`` values to take, e.g. ``("dimension_mismatch",)``.
    """

    ids: tuple[str, ...] = ()
    since: datetime | None = None
    until: datetime | None = None
    error_kinds: tuple[str, ...] = ()


@dataclass(frozen=True)
class DlqEntry:
    """One pending DLQ row as stored."""

    dlq_id: int
    id: str | None
    error_kind: str | None
    error_message: str | None
    payload: dict[str, Any]
    created_at: datetime | None  # the column has a default but allows NULL (an entry added by hand)
    attempts: int


#: No filter: every pending entry.
ALL_PENDING = DlqScope()

#: ``(dlq_id, error_kind, error_message)`` of an entry whose replay failed again.
Failure = tuple[int, str, str]


def select_pending(
    cur: psycopg.Cursor[Any],
    tables: TableNames,
    scope: DlqScope = ALL_PENDING,
    *,
    after_dlq_id: int = 0,
    limit: int = 500,
    lock: bool = True,
) -> list[DlqEntry]:
    """Pending entries in ``scope`` with ``dlq_id > after_dlq_id``, oldest first, at most ``limit``.

    Paging by ``dlq_id`` lets a replay walk the queue once even though entries that fail again stay
    pending. With ``lock`` the rows are locked ``FOR UPDATE SKIP LOCKED`` until the caller's
    transaction ends, so two replays running at once never settle the same entry twice.
    """
    where = [sql.SQL("status = %s"), sql.SQL("dlq_id > %s")]
    params: list[Any] = [PENDING, after_dlq_id]
    if scope.ids:
        where.append(sql.SQL("id = ANY(%s::uuid[])"))
        params.append(list(scope.ids))
    if scope.since is not None:
        where.append(sql.SQL("created_at >= %s"))
        params.append(scope.since)
    if scope.until is not None:
        where.append(sql.SQL("created_at < %s"))
        params.append(scope.until)
    if scope.error_kinds:
        where.append(sql.SQL("error_kind = ANY(%s::text[])"))
        params.append(list(scope.error_kinds))
    query = sql.SQL(
        "SELECT dlq_id, id::text AS id, error_kind, error_message, payload, created_at, attempts "
        "FROM {dlq} WHERE {where} ORDER BY dlq_id LIMIT %s{lock}"
    ).format(
        dlq=tables.identifiers()["dlq"],
        where=sql.SQL(" AND ").join(where),
        lock=sql.SQL(" FOR UPDATE SKIP LOCKED") if lock else sql.SQL(""),
    )
    params.append(limit)
    rows = cur.execute(query, params).fetchall()
    return [
        DlqEntry(
            dlq_id=int(dlq_id),
            id=row_id,
            error_kind=kind,
            error_message=message,
            payload=payload if isinstance(payload, dict) else {},
            created_at=created_at,
            attempts=int(attempts),
        )
        for dlq_id, row_id, kind, message, payload, created_at, attempts in rows
    ]


def _float(value: Any, position: int) -> float:
    # bool is an int to Python but never a vector value.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an int beyond float64; as a float32 it would be inf anyway
            return math.copysign(math.inf, value)
    if isinstance(value, str):
        try:
            return float(value)  # "nan", "inf", "-inf" (and any number kept as a string)
        except ValueError:
            pass
    raise PayloadError(f"payload vector[{position}] is {value!r}, not a number")


def vector_bytes(vector: Any) -> bytes:
    """The raw little-endian float32 bytes of a payload's ``vector``; ``b""`` when it is absent."""
    if vector is None:
        return b""
    if isinstance(vector, Mapping):
        encoded = vector.get("base64")
        if not isinstance(encoded, str):
            raise PayloadError("payload vector is an object without a 'base64' string")
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise PayloadError(f"payload vector is not valid base64: {exc}") from None
    if isinstance(vector, list):
        values = [_float(v, i) for i, v in enumerate(vector)]
        # Each JSON number is the float64 spelling of a float32, so the cast is exact; a value a
        # float32 cannot hold was not written by validation, and becomes inf just as on the wire.
        with np.errstate(over="ignore"):
            return np.asarray(values, dtype=np.float64).astype(FLOAT32_LE).tobytes()
    raise PayloadError(f"payload vector is a {type(vector).__name__}, expected a list of numbers")


def _text(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("base64"), str):
        try:  # text with NUL bytes, which JSONB cannot hold (validation.json_text)
            return base64.b64decode(value["base64"], validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError) as exc:
            raise PayloadError(f"payload {name} has unreadable base64 text: {exc}") from None
    raise PayloadError(f"payload {name} is {value!r}, expected a string or null")


def _years(payload: Mapping[str, Any]) -> int | None:
    value = payload.get("exp_years")
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise PayloadError(f"payload exp_years is {value!r}, expected an integer or null")


def payload_to_chunk(payloads: Iterable[Mapping[str, Any]]) -> WireChunk:
    """The received rows that ``payloads`` record, as a :class:`WireChunk`, in order.

    ``_origin`` and other bookkeeping keys are ignored. :class:`PayloadError` when a payload
    cannot be read back (a replay reports that entry as still failing).
    """
    ids: list[str] = []
    company: list[str | None] = []
    years: list[int | None] = []
    english: list[str | None] = []
    keyword: list[str | None] = []
    vectors: list[bytes] = []
    defects: dict[int, tuple[CellDefect, ...]] = {}
    for i, payload in enumerate(payloads):
        ids.append(_text(payload, "id") or "")
        company.append(_text(payload, "company_name"))
        years.append(_years(payload))
        english.append(_text(payload, "english_level"))
        keyword.append(_text(payload, "primary_keyword"))
        vectors.append(vector_bytes(payload.get("vector")))
        if payload.get("defects"):
            defects[i] = _defects(payload["defects"])
    return WireChunk(ids, company, years, english, keyword, vectors, defects)


def _defects(recorded: Any) -> tuple[CellDefect, ...]:
    """The sender's defects of a row: its payload lacks those cells, so replaying the payload
    rejects the row again; only a re-fetch of a fixed row (``refetch``) stores it."""
    if not isinstance(recorded, list) or not all(isinstance(d, Mapping) for d in recorded):
        raise PayloadError("payload defects is not a list of objects")
    return tuple(
        CellDefect(str(d.get("column")), str(d.get("error_kind")), str(d.get("message")), d.get("value"))
        for d in recorded
    )


def _settle(cur: psycopg.Cursor[Any], tables: TableNames, dlq_ids: Sequence[int], status: str, delete: bool) -> int:
    if not dlq_ids:
        return 0
    dlq = tables.identifiers()["dlq"]
    if delete:
        query = sql.SQL("DELETE FROM {} WHERE dlq_id = ANY(%s) AND status = %s").format(dlq)
        cur.execute(query, (list(dlq_ids), PENDING))
    else:
        query = sql.SQL(
            "UPDATE {} SET status = %s, attempts = attempts + 1, last_attempt_at = now() "
            "WHERE dlq_id = ANY(%s) AND status = %s"
        ).format(dlq)
        cur.execute(query, (status, list(dlq_ids), PENDING))
    return cur.rowcount


def mark_resolved(cur: psycopg.Cursor[Any], tables: TableNames, dlq_ids: Sequence[int], *, delete: bool = False) -> int:
    """Settle entries whose row is now stored: ``resolved`` with the attempt counted, or deleted.

    Only pending entries are touched, so a second call changes nothing. Returns how many changed.
    Call it in the transaction that stored the rows, so that a crash keeps both or neither.
    """
    return _settle(cur, tables, dlq_ids, RESOLVED, delete)


def mark_superseded(
    cur: psycopg.Cursor[Any], tables: TableNames, dlq_ids: Sequence[int], *, delete: bool = False
) -> int:
    """Settle entries whose row was not written because a newer version is stored (see
    :func:`stored_versions`): ``superseded`` with the attempt counted, or deleted.

    Only pending entries are touched. Returns how many changed. Call it in the transaction that
    read the stored versions, so that no write can come in between.
    """
    return _settle(cur, tables, dlq_ids, SUPERSEDED, delete)


def stored_versions(cur: psycopg.Cursor[Any], tables: TableNames, ids: Sequence[str]) -> dict[str, datetime]:
    """When each stored row of ``ids`` (canonical UUID strings) was last written, by id.

    That is the later ``updated_at`` of its metadata and its embedding row: an update that changes
    only the vector leaves the metadata's ``updated_at`` as it was. Both are ``timestamp`` columns
    filled by ``now()`` (by their default on insert, COPY included), like the DLQ's ``created_at``,
    so they compare with it as stored, whatever the reading session's time zone. Ids not stored (or
    stored without any ``updated_at``) are absent.

    The stored metadata rows are locked ``FOR UPDATE`` until the caller's transaction ends, in id
    order as the writer locks them, so that no other writer stores a newer version of them between
    this read and the caller's write (a row not stored yet has nothing to lock).
    """
    if not ids:
        return {}
    ident = tables.identifiers()
    rows = cur.execute(
        sql.SQL(
            "SELECT m.id::text, GREATEST(m.updated_at, e.updated_at) FROM {metadata} AS m "
            "LEFT JOIN {embedding} AS e ON e.id = m.id WHERE m.id = ANY(%s::uuid[]) "
            "ORDER BY m.id FOR UPDATE OF m"
        ).format(metadata=ident["metadata"], embedding=ident["embedding"]),
        (list(ids),),
    ).fetchall()
    return {row_id: written for row_id, written in rows if written is not None}


def transaction_time(cur: psycopg.Cursor[Any]) -> datetime:
    """What ``now()`` writes into a ``timestamp`` column in the current transaction (its start, in
    the session's time zone): the ``updated_at`` of every row this transaction writes."""
    row = cur.execute("SELECT LOCALTIMESTAMP").fetchone()
    assert row is not None
    return row[0]


def mark_failed(cur: psycopg.Cursor[Any], tables: TableNames, failures: Sequence[Failure]) -> None:
    """Count another failed attempt on each entry and keep its latest reason.

    The entry is updated in place rather than dead-lettered again: one entry a row, whose
    ``attempts`` says how often a replay has tried it.
    """
    if not failures:
        return
    cur.executemany(
        sql.SQL(
            "UPDATE {} SET attempts = attempts + 1, last_attempt_at = now(), error_kind = %s, "
            "error_message = %s WHERE dlq_id = %s AND status = %s"
        ).format(tables.identifiers()["dlq"]),
        [(kind, message, dlq_id, PENDING) for dlq_id, kind, message in failures],
    )


def dead_letter(
    cur: psycopg.Cursor, tables: TableNames, rejected: Sequence[Rejected], origin: Mapping[str, Any]
) -> None:
    """Insert rejected rows once each (by ``row_key``); a pending entry seen again keeps its first
    origin and takes the newest reason, so re-running a load leaves the DLQ as it was. A resolved
    entry whose row is rejected again is pending again: the row came back and was not stored.

    Each entry keeps the row's hash as received (``row_hash``, digest.py): a pending entry stands
    for the source's row in range digests (storage/sync.py)."""
    cur.executemany(
        sql.SQL(
            "INSERT INTO {dlq} AS t (id, error_kind, error_message, payload, row_key, row_hash) "
            "VALUES (%s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (row_key) DO UPDATE SET status = 'pending', error_kind = EXCLUDED.error_kind, "
            "error_message = EXCLUDED.error_message, row_hash = EXCLUDED.row_hash WHERE t.status <> 'pending' OR "
            "(t.error_kind, t.error_message, t.row_hash) IS DISTINCT FROM "
            "(EXCLUDED.error_kind, EXCLUDED.error_message, EXCLUDED.row_hash)"
        ).format(dlq=tables.identifiers()["dlq"]),
        [
            (r.id, r.kind, r.message, Jsonb({**r.payload, "_origin": dict(origin)}), r.row_key, _rejected_hash(r))
            for r in rejected
        ],
    )


def _rejected_hash(rejected: Rejected) -> int | None:
    """The row hash of a rejected row: as validation computed it from the received bytes, else
    (a row rejected elsewhere) from its payload, which records the row as received (storage/dlq.py)."""
    if rejected.row_hash is not None:
        return rejected.row_hash
    try:
        chunk = payload_to_chunk([rejected.payload])
    except PayloadError:
        return None
    return row_hash(
        chunk.ids[0],
        chunk.company_name[0],
        chunk.exp_years[0],
        chunk.english_level[0],
        chunk.primary_keyword[0],
        chunk.vectors[0],
    )


# -- what a range sync reads and settles (storage/sync.py) --------------------------------------


def pending_hashes(tables: TableNames, where: sql.Composable) -> sql.Composed:
    """``(id, row_hash)`` of the ids with a pending entry in ``where``, the newest entry of an id
    winning: the hash a dead-lettered row counts with in a range's digest (storage/sync.py)."""
    return sql.SQL(
        "SELECT DISTINCT ON (id) id, row_hash FROM {dlq} WHERE status = {pending} "
        "AND id IS NOT NULL AND row_hash IS NOT NULL AND {where} ORDER BY id, dlq_id DESC"
    ).format(dlq=tables.identifiers()["dlq"], where=where, pending=sql.Literal(PENDING))


def withdraw_pending(
    cur: psycopg.Cursor[Any], tables: TableNames, where: sql.Composable, missing: sql.Composable
) -> int:
    """Mark ``withdrawn`` the pending entries in ``where`` whose id the source no longer has
    (``missing``, a condition on the entry ``t``); how many."""
    condition = sql.SQL("t.id IS NOT NULL AND {where} AND {missing}").format(where=where, missing=missing)
    return _settle_pending(cur, tables, WITHDRAWN, condition)


def supersede_pending(cur: psycopg.Cursor[Any], tables: TableNames, source: sql.Composable) -> int:
    """Mark ``superseded`` the pending entries whose hash is not the one ``source`` (a table of
    ``(id, row_hash)``: the source's current rows) has for their id; how many."""
    condition = sql.SQL("t.id = s.id AND t.row_hash IS DISTINCT FROM s.row_hash")
    return _settle_pending(cur, tables, SUPERSEDED, condition, sql.SQL(" FROM {} AS s").format(source))


def _settle_pending(
    cur: psycopg.Cursor[Any],
    tables: TableNames,
    status: str,
    condition: sql.Composable,
    joined: sql.Composable | None = None,
) -> int:
    """Give the pending entries ``t`` (joined with ``joined``) that meet ``condition`` ``status``; how many."""
    cur.execute(
        sql.SQL(
            "UPDATE {dlq} AS t SET status = {status}, last_attempt_at = now(){joined} WHERE t.status = {pending} AND {condition}"
        ).format(
            dlq=tables.identifiers()["dlq"],
            status=sql.Literal(status),
            joined=joined or sql.SQL(""),
            pending=sql.Literal(PENDING),
            condition=condition,
        )
    )
    return cur.rowcount
