"""The most writers that all ingest tasks on one database run at once, and each task's share.

Each mapped ``ingest`` task opens ``db_connections`` writers. Under ``airflow dags test`` the
tasks run one after another; under a scheduler they run side by side, and four tasks of four
writers put sixteen writers on the database at once. On 2 cores that made a first load of
1,000,000 rows 1.23x the engine plus the index build, against 1.10x with one writer a task
(bench/RESULTS.md, "Target 3's first load in rounds"). A budget caps the writers of all tasks.

The invariant: a task registers with a session-level advisory lock on a session of its own,
keyed by that session's backend pid, and nothing else is stored. A task that dies (``kill -9``, a
lost worker) leaves the budget when its session ends, so no slot is ever leaked. A task's share
is the budget divided among the registered tasks, the remainder going to the lowest pids, so the
shares add up to the budget; it is never below one writer, so every task always progresses, and
never above the task's own writers. The share is read again at most every ``refresh`` seconds:
a task that finishes hands its writers to the tasks still running.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import psycopg

log = logging.getLogger(__name__)

#: First key of the budget's advisory locks (two-int form: the second is the backend pid).
WRITER_BUDGET_LOCK_CLASS = 0x77726231  # "wrb1"
#: Seconds between two reads of the registered tasks.
DEFAULT_REFRESH_SECONDS = 1.0

_REGISTERED = """
SELECT objid::bigint FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2 AND classid = %s::integer::oid
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY objid
"""


def share_of(budget: int, writers: int, rank: int, tasks: int) -> int:
    """Writers the task at ``rank`` (0-based, of ``tasks`` registered) may run at once.

    ``budget // tasks``, one more for the first ``budget % tasks`` ranks, at least 1 and at
    most ``writers`` (the task's own connections).
    """
    if budget < 1 or writers < 1:
        raise ValueError(f"a writer budget and a task's writers must be at least 1, got {budget} and {writers}")
    tasks = max(tasks, 1)
    base, extra = divmod(budget, tasks)
    return max(1, min(writers, base + (1 if rank < extra else 0)))


class WriterBudget:
    """One task's place in its database's writer budget (a context manager).

    :param conn: a session of this task only, in autocommit; it holds the task's registration
        and must stay open while the task writes.
    :param budget: the most writers of all registered tasks at once (at least 1).
    :param writers: this task's writers (its share never exceeds them).
    :param refresh: seconds between two reads of the registered tasks.
    :param on_change: called with each new share, and with 0 when the task leaves the budget
        (the operator sends it as a metric).
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        *,
        budget: int,
        writers: int,
        refresh: float = DEFAULT_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        share_of(budget, writers, 0, 1)  # refuses a budget or writers below 1, before registering
        self._conn = conn
        self.budget = budget
        self.writers = writers
        self._refresh = refresh
        self._clock = clock
        self._on_change = on_change
        self._pid = 0
        self._share = 0
        self._read_at = float("-inf")
        #: registered tasks at the last read, this one included
        self.tasks = 0

    def __enter__(self) -> WriterBudget:
        row = self._conn.execute(
            "SELECT pg_backend_pid(), pg_advisory_lock(%s, pg_backend_pid())", (WRITER_BUDGET_LOCK_CLASS,)
        ).fetchone()
        assert row is not None
        self._pid = int(row[0])
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._conn.closed:
            self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", (WRITER_BUDGET_LOCK_CLASS, self._pid))
        if self._on_change is not None and self._share:
            self._share = 0
            self._on_change(0)

    def share(self) -> int:
        """Writers this task may run at once now; reads the registered tasks when the last read
        is ``refresh`` seconds old, and logs each change."""
        now = self._clock()
        if now - self._read_at < self._refresh:
            return self._share
        self._read_at = now
        pids = [int(r[0]) for r in self._conn.execute(_REGISTERED, (WRITER_BUDGET_LOCK_CLASS,)).fetchall()]
        # Between registering and this read the own row is always there; without it (someone
        # released the lock by hand) the task counts itself, last.
        rank = pids.index(self._pid) if self._pid in pids else len(pids)
        self.tasks = max(len(pids), rank + 1)
        share = share_of(self.budget, self.writers, rank, self.tasks)
        if share != self._share:
            log.info(
                "writing on %d of %d connection(s) at once: a budget of %d writer(s) over %d ingest task(s) "
                "on this database",
                share,
                self.writers,
                self.budget,
                self.tasks,
            )
            self._share = share
            if self._on_change is not None:
                self._on_change(share)
        return share
