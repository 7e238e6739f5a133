"""A file in the real (Djinni) layout with every kind of cell issue 12's audit found among good rows,
and what each row must become: stored with given values, or a DLQ entry of a kind, column and value.

Used by the DAG test and the upload test, so that both paths are held to the same rule.
"""

from __future__ import annotations

import decimal
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg

from airflow_embedding_provider.ai_server.dataset import load_dataset
from dev.sample import make_sample
from dev.verify import compare, stored_rows

DIM = 384
#: Rows of the good part of the file.
GOOD_ROWS = 3000


@dataclass(frozen=True)
class Expect:
    """One special row: ``kind`` None = stored, with ``years`` (and its id canonical); else a DLQ
    entry of ``kind`` naming ``column``, whose recorded value is ``value`` (``...`` = not checked)."""

    id: Any
    kind: str | None
    column: str | None = None
    value: Any = ...
    years: Any = ...


def build(seed: int = 12) -> tuple[pd.DataFrame, list[Expect]]:
    rng = np.random.default_rng(seed)
    good = make_sample(GOOD_ROWS, seed=seed)
    for name, values in {
        "Extra Date": pd.date_range("2024-01-01", periods=GOOD_ROWS, freq="h"),
        "Extra Duration": pd.to_timedelta(np.arange(GOOD_ROWS), "s"),
        "Extra Period": pd.period_range("2020-01", periods=GOOD_ROWS, freq="M"),
        "Extra Interval": pd.interval_range(0, GOOD_ROWS),
        "Extra Decimal": [decimal.Decimal(i) / 4 for i in range(GOOD_ROWS)],
    }.items():
        good[name] = values  # type: ignore[call-overload]
    template = good.iloc[0].to_dict()
    rows: list[dict[str, Any]] = []
    expects: list[Expect] = []

    def add(
        expect_kind: str | None, column: str | None = None, value: Any = ..., years: Any = ..., **cells: Any
    ) -> None:
        row_id = cells.pop("id", None) or str(uuid.uuid4())
        vector = rng.standard_normal(DIM).astype(np.float32)
        row = template | {"id": row_id, "job_post_vectors": vector} | cells
        rows.append(row)
        expects.append(Expect(row_id, expect_kind, column, value, years))

    years = "Exp Years"
    # Exp Years as recruiting data writes it: stored.
    for raw, expected in [("no_exp", 0), ("no experience", 0), ("0", 0), ("5+", 5), ("10+", 10), ("10+ years", 10),
                          ("3-5", 3), ("", None), (decimal.Decimal("4"), 4), (pd.NA, None), ("2y", 2), (7.0, 7)]:  # fmt: skip
        add(None, years=expected, **{years: raw})  # type: ignore[arg-type]
    # Exp Years no rule turns into years: the DLQ.
    for raw, kind, recorded in [
        ("-1", "exp_years_out_of_range", "-1"),
        (2**31, "exp_years_out_of_range", 2**31),
        ("1.5", "invalid_exp_years", "1.5"),
        (1.5, "invalid_exp_years", 1.5),
        (float("inf"), "invalid_exp_years", {"type": "float", "repr": "inf"}),
        (True, "invalid_exp_years", True),
        ("ten", "invalid_exp_years", "ten"),
        (decimal.Decimal("2.5"), "invalid_exp_years", {"type": "Decimal", "repr": "Decimal('2.5')"}),
    ]:
        add(kind, years, recorded, **{years: raw})
    # Text cells: missing markers are NULL, other kinds the DLQ.
    for column, raw in [("Primary Keyword", pd.NA), ("Primary Keyword", float("nan")), ("English Level", pd.NaT)]:
        add(None, **{column: raw})  # type: ignore[arg-type]
    stamp = pd.Timestamp("2024-05-01 10:00")
    for column, raw, recorded in [
        ("Primary Keyword", 2.5, 2.5),
        ("English Level", True, True),
        ("Company Name", b"bytes", {"type": "bytes", "base64": "Ynl0ZXM="}),
        ("Company Name", ["a", "list"], ["a", "list"]),
        ("Primary Keyword", stamp, {"type": "Timestamp", "repr": repr(stamp)}),
    ]:
        add("not_text", column, recorded, **{column: raw})
    # Vectors of every real dtype and container: stored (values exact in float32).
    base = rng.standard_normal(DIM).astype(np.float32)
    for raw in [tuple(base.tolist()), base.astype(np.float64), base.tolist(), np.arange(DIM, dtype=np.int64),
                np.arange(DIM, dtype=np.float16)]:  # fmt: skip
        add(None, job_post_vectors=raw)
    # Vectors that are not lists of numbers: the DLQ.
    for raw in ["0.1, 0.2", [1.0, "x", *([0.5] * (DIM - 2))], {"a": 1.0}, [[1.0, 2.0], [3.0]]]:
        add("invalid_vector", "job_post_vectors", ..., job_post_vectors=raw)
    # Ids of any UUID version, and as uuid.UUID objects: stored under the canonical form.
    for raw in [uuid.uuid1(), uuid.uuid3(uuid.NAMESPACE_DNS, "djinni.co"), uuid.uuid5(uuid.NAMESPACE_URL, "x"),
                str(uuid.uuid4()).upper(), "{" + str(uuid.uuid4()) + "}"]:  # fmt: skip
        add(None, id=raw)
    # The rows that stalled the pipeline: a lone surrogate (text, id), 5 MB of text, 1.2M floats.
    add(
        "unencodable_text",
        "Company Name",
        {"type": "str", "repr": repr("Caf\ud800 GmbH")},
        **{"Company Name": "Caf\ud800 GmbH"},
    )
    add("unencodable_text", "id", {"type": "str", "repr": repr("id-\udcff")}, id="id-\udcff")
    add("text_too_long", "Company Name", ..., **{"Company Name": "x" * 5_000_000})
    add("vector_too_large", "job_post_vectors", ..., job_post_vectors=np.ones(1_200_000, dtype=np.float32))
    frame = pd.concat([good, pd.DataFrame(rows, columns=good.columns)], ignore_index=True)
    frame = frame.astype({years: object})
    # Shuffle so that the special rows are spread over chunks and partitions.
    frame = frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)
    return frame, expects


def canonical(row_id: Any) -> str | None:
    try:
        return str(row_id if isinstance(row_id, uuid.UUID) else uuid.UUID(str(row_id)))
    except ValueError:
        return None


def dlq_rows(dsn: str) -> list[tuple[str | None, str, str, dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id::text, error_kind, error_message, payload FROM recruit_embedding_dlq").fetchall()


def check_outcome(pg_dsn: str, pkl: Path, expects: list[Expect]) -> None:
    """Good rows bit-exact (and coerced as the rules say), each bad row one DLQ entry with its
    column, reason and original value, nothing else."""
    dataset = load_dataset(pkl)
    rows = dlq_rows(pg_dsn)
    bad = [e for e in expects if e.kind]
    assert Counter(kind for _, kind, _, _ in rows) == Counter(e.kind for e in bad)
    by_column_value: dict[tuple[str, str], list[Any]] = {}
    for row_id, kind, message, payload in rows:
        [defect] = payload["defects"]
        assert defect["error_kind"] == kind and f"'{defect['column']}'" in message, (kind, message)
        by_column_value.setdefault((kind, defect["column"]), []).append((row_id, defect["value"], payload))
    for e in bad:
        entries = by_column_value[(e.kind, e.column)]  # type: ignore[index]
        want = canonical(e.id)
        match = [x for x in entries if x[0] == want]
        assert len(match) == 1, (e, entries)
        if e.value is not ...:
            assert match[0][1] == e.value, (e, match[0][1])
    big = by_column_value[("text_too_long", "Company Name")][0][1]
    assert big["length"] == 5_000_000 and big["summarised"]
    huge = by_column_value[("vector_too_large", "job_post_vectors")][0][1]
    assert huge["length"] == 1_200_000
    with psycopg.connect(pg_dsn) as conn:
        check = compare(conn, dataset)
        stored = stored_rows(conn)
    assert check.equal, check.summary()
    assert len(stored) + len(rows) == len(dataset)
    for e in expects:
        if e.kind is None:
            row_id = canonical(e.id)
            assert row_id in stored, e
            if e.years is not ...:
                assert stored[row_id][0][1] == e.years, (e, stored[row_id])
