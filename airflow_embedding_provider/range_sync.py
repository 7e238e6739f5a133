"""Range sync: which id ranges a run syncs, and what a range's task streams and deletes with.

Shared by the DAG's operators and the bench. The plan compares each range's digest from the AI
server (``RangeDigests``) with the stored rows' (storage/sync.py) and keeps the ranges that differ
(every range when forced); a range's task lists the source's ids and row hashes of its range
(``ListRangeDigests``), streams the rows not stored as the source has them (or every row), and
hands the listing to its final transaction as the evidence it deletes with.

The deletion guard is decided here, once for the run: when the differing ranges together would
delete more than ``max_delete_fraction`` of the stored rows, no range may delete any.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import psycopg

from airflow_embedding_provider.partitions import DIFFERING_ROWS, EVERY_ROW, Partition
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, TableNames
from airflow_embedding_provider.storage.sync import (
    RangeSync,
    count_missing,
    differing_keys,
    stored_count,
    stored_digests,
)

if TYPE_CHECKING:  # a type only: the hook's own imports (airflow.sdk) stay out of this module
    from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook

_log = logging.getLogger(__name__)


class _Log(Protocol):
    """What is logged to: a ``logging.Logger`` or an operator's ``self.log``."""

    def info(self, event: Any, *args: Any, **kw: Any) -> Any: ...
    def warning(self, event: Any, *args: Any, **kw: Any) -> Any: ...


@dataclass(frozen=True)
class SyncPlan:
    """The ranges to sync (renumbered from 0) and the guard's inputs and verdict."""

    partitions: list[Partition]
    ranges: int
    would_delete: int
    stored_rows: int
    deletes_allowed: bool


def open_ended(ranges: list[Partition], after: str | None) -> list[Partition]:
    """The plan's ranges with the last one open to the end (and the first from ``after``), so that
    together they cover every stored id after ``after``, also those above the source's last id."""
    if not ranges:
        return ranges
    out = list(ranges)
    out[0] = dataclasses.replace(out[0], after_uuid=after)
    out[-1] = dataclasses.replace(out[-1], until_uuid=None)
    return out


def plan_sync(
    conn: psycopg.Connection,
    hook: GrpcEmbeddingHook,
    ranges: list[Partition],
    *,
    forced: bool,
    every_row: bool,
    max_delete_fraction: float,
    settle_end: bool = False,
    tables: TableNames = DEFAULT_TABLES,
    log: _Log = _log,
) -> SyncPlan:
    """The ranges that differ from the stored rows (all when ``forced``), each with the deletions
    it may make; ``every_row``: their tasks stream every row, not only the differing ones.

    ``settle_end`` (a plan over the whole source): when any range differs, the last range is
    synced too, even if equal (a listing, no rows streamed), so that the run's low watermark, and
    with it the checkpoint, reaches the source's last id once every range is equal (the
    checkpoint of a killed run can lag behind ranges that were already stored whole)."""
    bounds = [(p.after_uuid, p.until_uuid) for p in ranges]
    source = hook.range_digests(bounds)
    stored = stored_digests(conn, tables, bounds)
    changed = [i for i in range(len(ranges)) if stored[i].unhashed or stored[i].digest != source[i]]
    log.info(
        "range digests: %d of %d range(s) differ from the stored rows (source %d rows, stored %d)",
        len(changed),
        len(ranges),
        sum(d.rows for d in source),
        sum(d.digest.rows for d in stored),
    )
    differing = list(range(len(ranges))) if forced else changed
    if settle_end and differing and differing[-1] != len(ranges) - 1:
        differing = [*differing, len(ranges) - 1]
    # The guard counts the deletions of the ranges whose digest differs; a forced range whose
    # digest is equal may delete none (its task finds any it would, and holds them back).
    planned = dict.fromkeys(differing, 0)
    for i in changed:
        if stored[i].digest.rows == 0:
            continue  # nothing of the range is stored (a first load): nothing to delete, no listing needed
        keys, hashes = hook.list_range(*bounds[i])
        planned[i] = count_missing(conn, tables, bounds[i], keys, hashes)
    would_delete = sum(planned.values())
    stored_rows = stored_count(conn, tables)
    allowed = would_delete <= max_delete_fraction * stored_rows
    if not allowed:
        log.warning(
            "the source lacks %d of the %d stored rows (%.1f%%), above max_delete_fraction %s: "
            "this run deletes nothing and stores everything else",
            would_delete,
            stored_rows,
            100 * would_delete / max(stored_rows, 1),
            max_delete_fraction,
        )
    elif would_delete:
        log.info("the source no longer has %d of the %d stored rows: they go", would_delete, stored_rows)
    mode = EVERY_ROW if every_row else DIFFERING_ROWS
    partitions = [
        dataclasses.replace(ranges[i], index=k, sync=mode, max_deletes=planned[i] if allowed else 0)
        for k, i in enumerate(differing)
    ]
    return SyncPlan(partitions, len(ranges), would_delete, stored_rows, allowed)


def range_inputs(
    conn: psycopg.Connection,
    hook: GrpcEmbeddingHook,
    part: Partition,
    *,
    tables: TableNames = DEFAULT_TABLES,
    log: _Log = _log,
) -> tuple[RangeSync | None, bytes | None]:
    """For a syncing partition: the source's listing of the range (the evidence its final
    transaction deletes with) and, for ``DIFFERING_ROWS``, the ids to stream."""
    if part.sync is None:
        return None, None
    bounds = (part.after_uuid, part.until_uuid)
    keys, hashes = hook.list_range(*bounds)
    reconcile = RangeSync(part.after_uuid, part.until_uuid, keys, hashes, part.max_deletes)
    if part.sync == EVERY_ROW:
        return reconcile, None
    only_ids = differing_keys(conn, tables, bounds, keys, hashes)
    log.info(
        "range %s: %d of the source's %d rows are not stored as the source has them",
        part.label,
        len(only_ids) // 16,
        len(hashes),
    )
    return reconcile, only_ids
