from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from airflow_embedding_provider.digest import row_hash
from airflow_embedding_provider.validation import MAX_TEXT_LENGTH, validate_chunk
from airflow_embedding_provider.wire.codec import WireChunk

DIM = 4
COLUMNS = ("company_name", "exp_years", "english_level", "primary_keyword", "vectors")
GOOD_ID = "019b0ab5-1c02-7a99-b42a-2f729811ce12"


def _chunk(**overrides: object) -> WireChunk:
    row: dict[str, object] = {
        "ids": GOOD_ID,
        "company_name": "Acme",
        "exp_years": 3,
        "english_level": "upper",
        "primary_keyword": "Python",
        "vectors": np.ones(DIM, "<f4").tobytes(),
    }
    row.update(overrides)
    return WireChunk(**{k: [v] for k, v in row.items()})  # type: ignore[arg-type]


def test_a_good_row_passes_with_a_canonical_id() -> None:
    batch, rejected = validate_chunk(_chunk(ids=GOOD_ID.upper()), DIM)
    assert rejected == []
    assert list(batch.ids) == [GOOD_ID]
    assert batch.vectors.tolist() == [[1.0] * DIM]


BAD_ROWS = [
    ({"ids": ""}, "missing_id", "id is missing"),
    ({"ids": "row-17"}, "invalid_id", "id 'row-17' is not a UUID"),
    ({"vectors": b""}, "missing_vector", "vector is missing or empty"),
    ({"vectors": b"\x00" * 7}, "bad_vector_bytes", "vector has 7 bytes"),
    ({"vectors": np.ones(3, "<f4").tobytes()}, "dimension_mismatch", "vector has 3 dimensions, expected 4"),
    ({"vectors": np.array([1, np.nan, 1, 1], "<f4").tobytes()}, "non_finite_vector", "positions [1]"),
    ({"vectors": np.array([np.inf, 1, 1, 1], "<f4").tobytes()}, "non_finite_vector", "positions [0]"),
    ({"company_name": "a\x00b"}, "nul_byte", "company_name contains a NUL byte"),
    ({"primary_keyword": "x" * (MAX_TEXT_LENGTH + 1)}, "text_too_long", "primary_keyword has 10001 characters"),
    ({"exp_years": -1}, "exp_years_out_of_range", "exp_years is -1, expected 0 to 2147483647"),
    ({"exp_years": 2**31}, "exp_years_out_of_range", "exp_years is 2147483648, expected 0 to 2147483647"),
    ({"ids": GOOD_ID + "\n" + GOOD_ID}, "invalid_id", "is not a UUID"),
]


@pytest.mark.parametrize(("overrides", "kind", "message"), BAD_ROWS)
def test_bad_rows_are_rejected_with_a_reason(overrides: dict[str, object], kind: str, message: str) -> None:
    batch, rejected = validate_chunk(_chunk(**overrides), DIM)
    assert len(batch) == 0
    assert [r.kind for r in rejected] == [kind]
    assert message in rejected[0].message
    payload = rejected[0].payload
    assert set(payload) == {"id", "company_name", "exp_years", "english_level", "primary_keyword", "vector"}


def test_good_rows_keep_their_order_around_bad_ones() -> None:
    ids = [f"019b0ab5-1c02-7a99-b42a-{i:012d}" for i in range(4)]
    vectors = [np.full(DIM, i, "<f4").tobytes() for i in range(4)]
    vectors[1] = np.full(DIM, np.nan, "<f4").tobytes()
    chunk = WireChunk(
        ids=ids,
        company_name=[None] * 4,
        exp_years=[None] * 4,
        english_level=[None] * 4,
        primary_keyword=[None] * 4,
        vectors=vectors,
    )
    batch, rejected = validate_chunk(chunk, DIM)
    assert list(batch.ids) == [ids[0], ids[2], ids[3]]
    assert batch.vectors[:, 0].tolist() == [0.0, 2.0, 3.0]
    assert [r.id for r in rejected] == [ids[1]]
    assert rejected[0].payload["vector"] == ["nan"] * DIM


def _rows(n: int, **overrides: object) -> WireChunk:
    """``n`` good rows with distinct ids; ``overrides`` replace the middle row's fields."""
    rows = [_chunk(ids=f"019b0ab5-1c02-7a99-b42a-{i:012d}", vectors=np.full(DIM, i, "<f4").tobytes()) for i in range(n)]
    rows[n // 2] = _chunk(**{"ids": rows[n // 2].ids[0], "vectors": rows[n // 2].vectors[0], **overrides})
    columns = ("ids", "company_name", "exp_years", "english_level", "primary_keyword", "vectors")
    return WireChunk(**{c: [getattr(r, c)[0] for r in rows] for c in columns})  # type: ignore[arg-type]


@pytest.mark.parametrize(("overrides", "kind", "message"), BAD_ROWS)
def test_one_bad_row_among_good_ones_is_the_only_one_rejected(
    overrides: dict[str, object], kind: str, message: str
) -> None:
    # A clean chunk is checked a column at a time; one bad value must still send it to the
    # per-row checks, which reject that row alone.
    chunk = _rows(7, **overrides)
    batch, rejected = validate_chunk(chunk, DIM)
    assert [r.kind for r in rejected] == [kind]
    assert list(batch.ids) == [chunk.ids[i] for i in range(7) if i != 3]
    assert batch.vectors[:, 0].tolist() == [0.0, 1.0, 2.0, 4.0, 5.0, 6.0]


@pytest.mark.parametrize(
    "overrides",
    [
        {"company_name": None, "exp_years": None, "english_level": None, "primary_keyword": None},
        {"company_name": "", "exp_years": 0, "english_level": ""},
        {"exp_years": 2**31 - 1, "primary_keyword": "x" * MAX_TEXT_LENGTH},
        {"ids": GOOD_ID.upper()},
    ],
)
def test_edge_values_that_are_valid_pass_unchanged(overrides: dict[str, object]) -> None:
    chunk = _rows(5, **overrides)
    batch, rejected = validate_chunk(chunk, DIM)
    assert rejected == []
    assert len(batch) == 5
    for column in ("company_name", "exp_years", "english_level", "primary_keyword"):
        assert list(getattr(batch, column)) == getattr(chunk, column)
    assert batch.ids[2] == (GOOD_ID if "ids" in overrides else chunk.ids[2])


@pytest.mark.parametrize(
    "ids",
    [
        [],
        ["00000000-0000-7000-8000-000000000001", "019b0ab5-c1df-7859-891b-e14ebd83e55a"],
        ["019B0AB5-C1DF-7859-891B-E14EBD83E55A"],  # upper case: a UUID, but not canonical
        ["019b0ab5c1df7859891be14ebd83e55a0000"],  # 36 hex digits, no hyphens
        ["019b0ab5-c1df-7859-891b-e14ebd83e55", "a019b0ab5-c1df-7859-891b-e14ebd83e55a"],  # 35 + 37 joined = 2 x 36
        ["019b0ab5-c1df-7859-891b-e14ebd83e55g"],  # not hex
        ["019b0ab5-c1df-7859-891b-e14ebd83e5é5"],  # not ASCII
        ["019b0ab5-c1df-7859-891b-e14ebd83e55a", ""],
        ["{019b0ab5-c1df-7859-891b-e14ebd83e55}"],
        ["019b0ab5-c1df-7859-891b_e14ebd83e55a"],
        ["019b0ab5-c1df-7859-891b-e14ebd83e5-a"],  # a fifth hyphen
    ],
)
def test_the_batch_id_check_agrees_with_the_regular_expression(ids: list[str]) -> None:
    from airflow_embedding_provider.rows import CANONICAL_UUID as _CANONICAL_UUID
    from airflow_embedding_provider.validation import _all_canonical

    assert _all_canonical(ids) == all(_CANONICAL_UUID.fullmatch(i) for i in ids)


def _hashed_chunk(rows: int = 5) -> WireChunk:
    ids = [f"019b0ab5-1c02-7a99-b42a-2f729811ce{i:02x}" for i in range(rows)]
    vectors = [np.full(DIM, i, "<f4").tobytes() for i in range(rows)]
    names: list[str | None] = [f"Acme {i}" for i in range(rows)]
    years: list[int | None] = list(range(rows))
    levels: list[str | None] = ["upper"] * rows
    keywords: list[str | None] = [None] * rows
    hashes = np.array(
        [row_hash(*row) for row in zip(ids, names, years, levels, keywords, vectors, strict=True)], dtype=np.int64
    )
    return WireChunk(ids, names, years, levels, keywords, vectors, row_hashes=hashes)


def test_the_senders_row_hashes_reach_the_batch_when_they_check_out() -> None:
    chunk = _hashed_chunk()
    batch, rejected = validate_chunk(chunk, DIM)
    assert rejected == [] and batch.hashes is not None
    assert batch.hashes.tolist() == chunk.row_hashes.tolist()  # type: ignore[union-attr]
    # Through a slice (a sub-batch) and the writer's reordering alike, each row keeps its own hash.
    part, _ = validate_chunk(chunk.slice(1, 4), DIM)
    assert part.hashes is not None and part.hashes.tolist() == chunk.row_hashes[1:4].tolist()  # type: ignore[index]
    assert batch.take([3, 0]).hashes.tolist() == [chunk.row_hashes[3], chunk.row_hashes[0]]  # type: ignore[union-attr,index]


@pytest.mark.parametrize("wrong", [0, -1])
def test_a_chunk_whose_first_or_last_hash_is_wrong_is_hashed_here(wrong: int) -> None:
    chunk = _hashed_chunk()
    claimed = chunk.row_hashes.copy()  # type: ignore[union-attr]
    claimed[wrong] ^= 1
    batch, rejected = validate_chunk(dataclasses.replace(chunk, row_hashes=claimed), DIM)
    assert rejected == [] and len(batch) == 5
    assert batch.hashes is None  # the writer hashes the rows itself (storage/writer.py)


def test_a_chunk_with_a_rejected_row_carries_no_senders_hashes() -> None:
    chunk = _hashed_chunk()
    vectors = list(chunk.vectors)
    vectors[2] = np.array([np.nan] * DIM, "<f4").tobytes()
    batch, rejected = validate_chunk(dataclasses.replace(chunk, vectors=vectors), DIM)
    assert [r.kind for r in rejected] == ["non_finite_vector"] and len(batch) == 4
    assert batch.hashes is None


def test_an_id_stored_in_another_form_than_sent_is_not_hashed_by_the_sender() -> None:
    # The sender hashed the id as it sent it; the row is stored with its canonical id, so the
    # sender's hash is not the stored row's.
    chunk = _hashed_chunk(1)
    upper = [chunk.ids[0].upper()]
    hashes = np.array([row_hash(upper[0], *(getattr(chunk, c)[0] for c in COLUMNS))], dtype=np.int64)
    batch, _ = validate_chunk(dataclasses.replace(chunk, ids=upper, row_hashes=hashes), DIM)
    assert list(batch.ids) == [chunk.ids[0]] and batch.hashes is None
