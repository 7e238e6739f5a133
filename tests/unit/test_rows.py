"""``rows.py``: the row batch's take/slice/concat and the canonical UUID text every layer uses."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from airflow_embedding_provider.rows import (
    CANONICAL_UUID,
    ROW_COLUMNS,
    RowBatch,
    canonical_uuid,
    canonical_uuid_or_none,
)


def _batch(n: int, start: int = 0, dimension: int = 3) -> RowBatch:
    rows = range(start, start + n)
    return RowBatch(
        ids=[str(uuid.UUID(int=i)) for i in rows],
        company_name=[f"c{i}" for i in rows],
        exp_years=[i if i % 2 else None for i in rows],
        english_level=[f"e{i}" for i in rows],
        primary_keyword=[None if i % 3 == 0 else f"k{i}" for i in rows],
        vectors=np.arange(start * dimension, (start + n) * dimension, dtype=np.float32).reshape(n, dimension),
    )


def test_concat_keeps_every_column_in_order() -> None:
    a, b = _batch(2), _batch(3, start=2)
    joined = RowBatch.concat([a, b], 3)
    whole = _batch(5)
    assert [joined.row(i) for i in range(5)] == [whole.row(i) for i in range(5)]
    assert joined.vectors.dtype == np.float32 and joined.vectors.tobytes() == whole.vectors.tobytes()


def test_concat_of_nothing_is_empty_of_the_dimension() -> None:
    empty = RowBatch.concat([], 7)
    assert len(empty) == 0 and empty.dimension == 7


def test_take_and_slice_agree_with_row() -> None:
    batch = _batch(6)
    taken = batch.take([4, 0, 4])
    assert [taken.row(i) for i in range(3)] == [batch.row(4), batch.row(0), batch.row(4)]
    part = batch.slice(2, 5)
    assert [part.row(i) for i in range(3)] == [batch.row(i) for i in range(2, 5)]


def test_columns_of_different_lengths_are_refused() -> None:
    good = _batch(2)
    with pytest.raises(ValueError, match="differ in length"):
        RowBatch(
            ids=good.ids,
            company_name=good.company_name[:1],
            exp_years=good.exp_years,
            english_level=good.english_level,
            primary_keyword=good.primary_keyword,
            vectors=good.vectors,
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("019b0ab5-42f1-7c87-b879-9d838b83d2e5", "019b0ab5-42f1-7c87-b879-9d838b83d2e5"),
        ("019B0AB5-42F1-7C87-B879-9D838B83D2E5", "019b0ab5-42f1-7c87-b879-9d838b83d2e5"),
        ("019b0ab542f17c87b8799d838b83d2e5", "019b0ab5-42f1-7c87-b879-9d838b83d2e5"),
        ("{019b0ab5-42f1-7c87-b879-9d838b83d2e5}", "019b0ab5-42f1-7c87-b879-9d838b83d2e5"),
        ("019b0ab5-42f1-7c87-b879-9d838b83d2e5\n", None),
        ("not-a-uuid", None),
        ("", None),
    ],
)
def test_canonical_uuid_text(text: str, expected: str | None) -> None:
    assert canonical_uuid_or_none(text) == expected
    if expected is None:
        with pytest.raises(ValueError, match="not a UUID"):
            canonical_uuid(text)
    else:
        assert canonical_uuid(text) == expected


def test_only_the_canonical_form_matches_the_pattern() -> None:
    assert CANONICAL_UUID.fullmatch("019b0ab5-42f1-7c87-b879-9d838b83d2e5")
    assert not CANONICAL_UUID.fullmatch("019B0AB5-42F1-7C87-B879-9D838B83D2E5")
    assert not CANONICAL_UUID.fullmatch("019b0ab5-42f1-7c87-b879-9d838b83d2e5\n")


def test_a_value_that_is_not_text_is_not_a_uuid() -> None:
    with pytest.raises(ValueError, match="not a UUID"):
        canonical_uuid(42)  # type: ignore[arg-type]


def test_the_columns_are_the_batchs_fields() -> None:
    import dataclasses

    # The six columns, then the rows' hashes when known (derived from the columns, not one of them).
    assert tuple(f.name for f in dataclasses.fields(RowBatch)) == (*ROW_COLUMNS, "hashes")
