"""The stored side of range sync: digests and listings of id ranges, and deleting what the source
no longer has.

A stored row counts in its range with the ``row_hash`` written with it (``digest.py``). A row the
batch side dead-letters counts as present too, with the hash of the row as received, for as long
as its DLQ entry is pending: a bad row the source still sends then leaves its range equal, instead
of being re-sent and dead-lettered again on every run. When an id has both, the pending entry
stands for it (it is what the source sent last).

Deleting is safe against crashes, retries and second runs because it only ever happens in
:func:`reconcile_range`, with the source's complete id list of the range as evidence, in the
transaction that marks the range done: the rows deleted are exactly the stored rows of the range
whose id the source did not list. The range's DLQ entries are settled in that transaction too:
those of ids the source no longer has become ``withdrawn``; those whose hash is not the source's
current row become ``superseded`` (a newer version of the row exists).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from airflow_embedding_provider.digest import Hashes, RangeDigest
from airflow_embedding_provider.storage.copy_binary import HEADER, TRAILER
from airflow_embedding_provider.storage.dlq import pending_hashes, supersede_pending, withdraw_pending
from airflow_embedding_provider.storage.schema import TableNames

Bounds = tuple[str | None, str | None]
#: A sync that would delete more than this share of the stored rows deletes none (the guard).
DEFAULT_MAX_DELETE_FRACTION = 0.2


@dataclass(frozen=True)
class StoredDigest:
    """A range's digest over the stored rows; ``unhashed`` rows (written before ``row_hash``
    existed) make it unknowable, so such a range always counts as differing."""

    digest: RangeDigest
    unhashed: int


@dataclass(frozen=True)
class RangeSync:
    """The evidence and the limit a range's final transaction reconciles with.

    :param after_uuid: exclusive lower bound (``None`` = from the first id).
    :param until_uuid: inclusive upper bound (``None`` = to the last id).
    :param keys: the source's ids of the range, 16-byte keys concatenated in ascending order.
    :param hashes: the source's row hash of each id, in the order of ``keys``.
    :param max_deletes: delete at most this many rows; a range that would delete more deletes
        nothing and reports the count as blocked (the run's ``max_delete_fraction`` guard).
    """

    after_uuid: str | None
    until_uuid: str | None
    keys: bytes
    hashes: Hashes
    max_deletes: int

    @property
    def last_source_id(self) -> str | None:
        """The source's highest id of the range: once the range is synced, everything up to it is stored."""
        return str(uuid.UUID(bytes=self.keys[-16:])) if self.keys else None


def _in_range(bounds: Bounds, column: str = "id") -> sql.Composable:
    after, until = bounds
    parts: list[sql.Composable] = [sql.SQL("TRUE")]
    if after:
        parts.append(sql.SQL("{} > {}::uuid").format(sql.Identifier(column), sql.Literal(after)))
    if until:
        parts.append(sql.SQL("{} <= {}::uuid").format(sql.Identifier(column), sql.Literal(until)))
    return sql.SQL(" AND ").join(parts)


def _effective(tables: TableNames, bounds: Bounds) -> sql.Composed:
    """``(id, h)``: each id of the range once, with the hash it counts with (see the module doc)."""
    ids = tables.identifiers()
    where = _in_range(bounds)
    return sql.SQL(
        "WITH d AS ({pending}), m AS (SELECT id, row_hash FROM {metadata} WHERE {where}) "
        "SELECT id, coalesce(d.row_hash, m.row_hash) AS h FROM m FULL JOIN d USING (id)"
    ).format(pending=pending_hashes(tables, where), metadata=ids["metadata"], where=where)


def stored_digests(conn: psycopg.Connection, tables: TableNames, ranges: Sequence[Bounds]) -> list[StoredDigest]:
    """The stored side's digest of each range, in one statement."""
    if not ranges:
        return []
    parts = [
        sql.SQL("SELECT {i}, count(*), count(*) - count(h), coalesce(sum(h), 0) FROM ({e}) AS e").format(
            i=sql.Literal(i), e=_effective(tables, bounds)
        )
        for i, bounds in enumerate(ranges)
    ]
    with conn.transaction():
        rows = conn.execute(sql.SQL(" UNION ALL ").join(parts)).fetchall()
    by_index = {int(r[0]): r for r in rows}
    return [
        StoredDigest(RangeDigest.from_sum(by_index[i][1], by_index[i][3]), int(by_index[i][2]))
        for i in range(len(ranges))
    ]


def stored_listing(conn: psycopg.Connection, tables: TableNames, bounds: Bounds) -> dict[bytes, int | None]:
    """16-byte key -> the hash each stored id of the range counts with (``None``: unhashed)."""
    with conn.transaction():
        rows = conn.execute(_effective(tables, bounds)).fetchall()
    return {row_id.bytes: h for row_id, h in rows}


_SOURCE = sql.Identifier("_embedding_sync_source")
#: The stored row ``t`` has no id in the source's listing.
_MISSING = sql.SQL("NOT EXISTS (SELECT 1 FROM {} AS s WHERE s.id = t.id)").format(_SOURCE)


def load_source(cur: psycopg.Cursor[Any], keys: bytes, hashes: Hashes) -> None:
    """The source's listing of a range into this session's temporary table ``(id, row_hash)``,
    emptied at commit: one COPY BINARY laid out by numpy (24 bytes a row), no Python object a row."""
    cur.execute(
        sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (id uuid PRIMARY KEY, row_hash int8) ON COMMIT DELETE ROWS").format(
            _SOURCE
        )
    )
    cur.execute(sql.SQL("DELETE FROM {}").format(_SOURCE))
    layout = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", "S16"), ("hash_len", ">i4"), ("hash", ">i8")])
    rows = np.empty(len(hashes), dtype=layout)
    rows["fields"], rows["id_len"], rows["hash_len"] = 2, 16, 8
    rows["id"] = np.frombuffer(keys, dtype="S16")
    rows["hash"] = hashes
    with cur.copy(sql.SQL("COPY {} (id, row_hash) FROM STDIN (FORMAT BINARY)").format(_SOURCE)) as copy:
        copy.write(HEADER + rows.tobytes() + TRAILER)
    cur.execute(sql.SQL("ANALYZE {}").format(_SOURCE))


def differing_keys(conn: psycopg.Connection, tables: TableNames, bounds: Bounds, keys: bytes, hashes: Hashes) -> bytes:
    """The source's keys (ascending, concatenated) whose row is not stored as the source has it,
    compared in PostgreSQL against the hash each stored id counts with.

    A range that counts no stored row (a first load) differs in every listed row: a listing in
    strictly ascending order (as the AI server sends it) comes back as it is, without loading it
    into PostgreSQL. Otherwise PostgreSQL returns the differing keys already concatenated (one
    ``bytea``), not one UUID object a row."""
    if _strictly_ascending(keys) and not counts_rows(conn, tables, bounds):
        return keys
    rows = _against_source(
        conn,
        keys,
        hashes,
        sql.SQL(
            "SELECT coalesce(string_agg(uuid_send(s.id), ''::bytea ORDER BY s.id), ''::bytea) FROM {source} AS s "
            "LEFT JOIN ({effective}) AS e USING (id) WHERE e.h IS DISTINCT FROM s.row_hash"
        ).format(source=_SOURCE, effective=_effective(tables, bounds)),
    )
    return bytes(rows[0][0])


def _strictly_ascending(keys: bytes) -> bool:
    """Whether concatenated 16-byte keys are in strictly ascending byte order (PostgreSQL orders
    ``uuid`` by its bytes): what ``ORDER BY`` over the listing's primary key would return."""
    column = np.frombuffer(keys, dtype="S16")
    return bool(np.all(column[1:] > column[:-1]))


def counts_rows(conn: psycopg.Connection, tables: TableNames, bounds: Bounds) -> bool:
    """Whether any id of the range counts as stored (a stored row, or a pending DLQ entry; see
    the module doc)."""
    with conn.transaction():
        row = conn.execute(sql.SQL("SELECT EXISTS ({})").format(_effective(tables, bounds))).fetchone()
    return bool(row and row[0])


def count_missing(conn: psycopg.Connection, tables: TableNames, bounds: Bounds, keys: bytes, hashes: Hashes) -> int:
    """How many stored rows of the range the source does not list (what a sync would delete)."""
    rows = _against_source(
        conn,
        keys,
        hashes,
        sql.SQL("SELECT count(*) FROM {metadata} AS t WHERE {where} AND {missing}").format(
            metadata=tables.identifiers()["metadata"], where=_in_range(bounds), missing=_MISSING
        ),
    )
    return int(rows[0][0]) if rows else 0


def _against_source(conn: psycopg.Connection, keys: bytes, hashes: Hashes, query: sql.Composed) -> list[Any]:
    """The rows of ``query``, run with the source's listing loaded (:func:`load_source`), in one transaction."""
    with conn.transaction(), conn.cursor() as cur:
        load_source(cur, keys, hashes)
        return cur.execute(query).fetchall()


def stored_count(conn: psycopg.Connection, tables: TableNames) -> int:
    with conn.transaction():
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(tables.identifiers()["metadata"])).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class Reconciled:
    """What :func:`reconcile_range` did: rows deleted, or (over the limit) the rows it would have."""

    deleted: int
    blocked: int
    withdrawn: int
    superseded: int


def reconcile_range(cur: psycopg.Cursor[Any], tables: TableNames, sync: RangeSync) -> Reconciled:
    """Delete the range's stored rows whose id the source did not list, unless there are more than
    ``sync.max_deletes`` of them (then none), and settle the range's pending DLQ entries; run it in
    the transaction that records the range as done. Embeddings go with their metadata (ON DELETE
    CASCADE, docs/design.md §4.3)."""
    ids = tables.identifiers()
    where = _in_range((sync.after_uuid, sync.until_uuid), "id")
    load_source(cur, sync.keys, sync.hashes)
    missing = _MISSING
    row = cur.execute(
        sql.SQL("SELECT count(*) FROM {metadata} AS t WHERE {where} AND {missing}").format(
            metadata=ids["metadata"], where=where, missing=missing
        )
    ).fetchone()
    found = int(row[0]) if row else 0
    deleted = withdrawn = 0
    if found > sync.max_deletes:
        blocked = found
    else:
        blocked = 0
        if found:
            cur.execute(
                sql.SQL("DELETE FROM {metadata} AS t WHERE {where} AND {missing}").format(
                    metadata=ids["metadata"], where=where, missing=missing
                )
            )
            deleted = cur.rowcount
        withdrawn = withdraw_pending(cur, tables, where, missing)
    superseded = supersede_pending(cur, tables, _SOURCE)
    return Reconciled(deleted=deleted, blocked=blocked, withdrawn=withdrawn, superseded=superseded)
