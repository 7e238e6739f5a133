"""The arithmetic of a writer budget's shares (storage/writer_budget.py)."""

from __future__ import annotations

import pytest

from airflow_embedding_provider.storage.writer_budget import share_of


@pytest.mark.parametrize(
    ("budget", "tasks", "shares"),
    [
        (4, 1, [4]),
        (4, 2, [2, 2]),
        (4, 3, [2, 1, 1]),
        (4, 4, [1, 1, 1, 1]),
        (7, 3, [3, 2, 2]),
    ],
)
def test_the_shares_add_up_to_the_budget_the_remainder_to_the_first_ranks(
    budget: int, tasks: int, shares: list[int]
) -> None:
    assert [share_of(budget, 8, rank, tasks) for rank in range(tasks)] == shares
    assert sum(shares) == budget


def test_more_tasks_than_the_budget_still_write_on_one_connection_each() -> None:
    assert [share_of(4, 4, rank, 6) for rank in range(6)] == [1] * 6


def test_a_share_never_exceeds_the_tasks_own_connections() -> None:
    assert share_of(8, 3, 0, 1) == 3
    assert share_of(8, 2, 0, 2) == 2


@pytest.mark.parametrize(("budget", "writers"), [(0, 4), (4, 0), (-1, 4)])
def test_a_budget_or_writers_below_one_are_refused(budget: int, writers: int) -> None:
    with pytest.raises(ValueError, match="must be at least 1"):
        share_of(budget, writers, 0, 1)
