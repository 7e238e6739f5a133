"""A writer budget shared by the ingest tasks of one database, on real sessions (storage/writer_budget.py)."""

from __future__ import annotations

import contextlib
import logging

import psycopg
import pytest

from airflow_embedding_provider.storage.writer_budget import WRITER_BUDGET_LOCK_CLASS, WriterBudget
from dev.embedded_postgres import EmbeddedPostgres


def _session(dsn: str) -> psycopg.Connection:
    return psycopg.connect(dsn, autocommit=True)


def test_registered_tasks_share_the_budget_in_pid_order_and_a_finished_one_hands_its_share_on(pg_dsn: str) -> None:
    with contextlib.ExitStack() as stack:
        sessions = [stack.enter_context(_session(pg_dsn)) for _ in range(3)]
        budgets = [stack.enter_context(WriterBudget(s, budget=4, writers=4, refresh=0)) for s in sessions]
        by_pid = sorted(range(3), key=lambda i: sessions[i].info.backend_pid)
        shares = [budgets[i].share() for i in by_pid]
        assert shares == [2, 1, 1]
        assert {b.tasks for b in budgets} == {3}
        # The first in pid order finishes: the other two split the budget between them.
        budgets[by_pid[0]].__exit__(None, None, None)
        assert [budgets[i].share() for i in by_pid[1:]] == [2, 2]


def test_a_task_whose_session_dies_leaves_the_budget(pg_dsn: str) -> None:
    # kill -9 of a task, a lost worker: its session ends and nothing of it stays registered.
    with (
        _session(pg_dsn) as mine,
        _session(pg_dsn) as other,
        _session(pg_dsn) as admin,
        WriterBudget(mine, budget=4, writers=4, refresh=0) as budget,
    ):
        WriterBudget(other, budget=4, writers=4).__enter__()
        assert budget.share() == 2
        # With a timeout, pg_terminate_backend returns once the session (and its lock) has ended.
        assert admin.execute("SELECT pg_terminate_backend(%s, 10000)", (other.info.backend_pid,)).fetchone() == (True,)
        assert budget.share() == 4
        assert budget.tasks == 1


def test_the_budget_is_per_database(postgres: EmbeddedPostgres, pg_dsn: str) -> None:
    elsewhere = postgres.create_database("t_writer_budget_elsewhere")
    with (
        _session(pg_dsn) as mine,
        _session(elsewhere) as other,
        WriterBudget(mine, budget=4, writers=4, refresh=0) as budget,
        WriterBudget(other, budget=4, writers=4),
    ):
        assert budget.share() == 4


def test_the_share_is_read_again_only_after_refresh_seconds(pg_dsn: str) -> None:
    now = [0.0]
    with (
        _session(pg_dsn) as mine,
        _session(pg_dsn) as other,
        WriterBudget(mine, budget=4, writers=4, refresh=1.0, clock=lambda: now[0]) as budget,
    ):
        assert budget.share() == 4
        with WriterBudget(other, budget=4, writers=4):
            assert budget.share() == 4  # no read yet
            now[0] = 1.0
            assert budget.share() == 2


def test_leaving_releases_the_lock_and_each_change_is_logged(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="airflow_embedding_provider.storage.writer_budget")
    with _session(pg_dsn) as mine, _session(pg_dsn) as other:
        with WriterBudget(mine, budget=3, writers=2, refresh=0) as budget:
            assert budget.share() == 2
            with WriterBudget(other, budget=3, writers=2):
                # 3 over 2 tasks: the lower pid gets the remainder.
                assert budget.share() == (2 if mine.info.backend_pid < other.info.backend_pid else 1)
        held = mine.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
            "AND classid = %s::integer::oid",
            (WRITER_BUDGET_LOCK_CLASS,),
        ).fetchone()
        assert held == (0,)
    assert "writing on 2 of 2 connection(s) at once: a budget of 3 writer(s) over 1 ingest task(s)" in caplog.text


def test_each_change_of_the_share_and_the_leave_are_reported(pg_dsn: str) -> None:
    seen: list[int] = []
    with _session(pg_dsn) as mine, _session(pg_dsn) as other:
        with WriterBudget(mine, budget=4, writers=4, refresh=0, on_change=seen.append) as budget:
            assert budget.share() == 4
            assert budget.share() == 4  # no change, nothing reported
            with WriterBudget(other, budget=4, writers=4):
                assert budget.share() == 2
            assert budget.share() == 4
        assert seen == [4, 2, 4, 0]


def test_a_budget_below_one_is_refused_before_registering(pg_dsn: str) -> None:
    with _session(pg_dsn) as mine, pytest.raises(ValueError, match="must be at least 1"):
        WriterBudget(mine, budget=0, writers=4)
