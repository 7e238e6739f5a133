"""Id ranges of the source: the unit a mapped ingest task streams and stores."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: The ingest DAG's default cap on its mapped tasks (Param ``max_partitions``), one stream each:
#: the fan-out the AI server sizes its threads for.
DEFAULT_MAX_PARTITIONS = 64
#: The ingest DAG's default aim of rows a mapped task (Param ``rows_per_partition``). Each mapped
#: task pays its own start (a process, its connections, its stream) before its first row, and the
#: rows of one task go at tens of thousands a second: at the former 20,000 a 1M load made 50 tasks,
#: and their ingest took 34.4 s under ``airflow dags test`` against 25.4 s for the 4 tasks of this
#: default (bench/RESULTS.md). 250,000 keeps the seed's 141,897 rows in one task and still fans 1M
#: rows out to four; lower it to fill more worker slots than that (README, Sizing a deployment).
DEFAULT_ROWS_PER_PARTITION = 250_000
#: How a partition syncs its range (range sync, storage/sync.py). ``None``: rows after the start
#: are streamed and upserted, nothing is deleted (a stream resumed after a checkpoint).
#: ``DIFFERING_ROWS``: the source lists its ids and row hashes; only rows not stored as the
#: source has them are streamed, and stored rows the source did not list are deleted.
#: ``EVERY_ROW``: every row of the range is streamed, and the same deletions follow.
DIFFERING_ROWS = "differing_rows"
EVERY_ROW = "every_row"
SYNC_MODES = (DIFFERING_ROWS, EVERY_ROW)


def partition_count(rows: int, rows_per_partition: int, max_partitions: int) -> int:
    """How many ranges a plan cuts ``rows`` rows into: ``ceil(rows / rows_per_partition)``, at least
    one, at most ``max_partitions`` (the AI server's ``PlanPartitions``)."""
    return max(1, min(max_partitions, -(-rows // max(1, rows_per_partition))))


@dataclass(frozen=True)
class Partition:
    """One id range of a run: rows strictly after ``after_uuid`` up to ``until_uuid`` inclusive.

    ``after_uuid`` ``None`` = from the first row; ``until_uuid`` ``None`` = to the last row.
    """

    index: int
    after_uuid: str | None
    until_uuid: str | None
    rows: int
    sync: str | None = None  # one of SYNC_MODES, or None
    max_deletes: int = 0  # a sync deletes at most this many rows of the range (the run's guard)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Partition:
        return cls(
            index=int(data["index"]),
            after_uuid=data.get("after_uuid") or None,
            until_uuid=data.get("until_uuid") or None,
            rows=int(data.get("rows", 0)),
            sync=data.get("sync") or None,
            max_deletes=int(data.get("max_deletes") or 0),
        )

    @property
    def label(self) -> str:
        """Short text for Airflow's map index: ``#3 019b0ab5…→019b0ac1… (47299 rows)``."""
        after = (self.after_uuid or "start")[:8]
        until = (self.until_uuid or "end")[:8]
        return f"#{self.index} {after}..{until} ({self.rows} rows)"
