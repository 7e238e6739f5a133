"""Cells as real recruiting data writes them: what each becomes, and that none stops the file."""

from __future__ import annotations

import decimal
import json
import pickle
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from airflow_embedding_provider.ai_server.cells import (
    MAX_VECTOR_BYTES,
    cell_json,
    text_column,
    vector_column,
    years_column,
)
from airflow_embedding_provider.ai_server.dataset import DatasetError, load_dataset
from airflow_embedding_provider.validation import INT4_MAX, MAX_TEXT_LENGTH
from airflow_embedding_provider.wire.codec import MAX_CHUNK_BYTES, decode_chunk
from dev.sample import make_sample


@pytest.mark.parametrize(
    ("raw", "years"),
    [
        (3, 3),
        (np.int64(4), 4),
        (3.0, 3),
        (decimal.Decimal("6"), 6),
        ("3", 3),
        (" 3 ", 3),
        ("3y", 3),
        ("3 yrs", 3),
        ("3 years", 3),
        ("0", 0),
        ("no_exp", 0),
        ("No Experience", 0),
        ("3-5", 3),
        ("3 - 5 years", 3),
        ("1 to 2 years", 1),
        ("5+", 5),
        ("10+", 10),
        ("10+ years", 10),
        ("", None),
        ("  ", None),
        (None, None),
        (float("nan"), None),
        (pd.NA, None),
        (INT4_MAX, INT4_MAX),
    ],
)
def test_years_as_recruiting_data_writes_them(raw: Any, years: int | None) -> None:
    defects: dict[int, Any] = {}
    assert years_column([raw], "Exp Years", defects) == [years]
    assert defects == {}


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("-1", "exp_years_out_of_range"),
        (-3, "exp_years_out_of_range"),
        (2**31, "exp_years_out_of_range"),
        ("1.5", "invalid_exp_years"),
        (1.5, "invalid_exp_years"),
        (float("inf"), "invalid_exp_years"),
        (True, "invalid_exp_years"),
        ("5-3", "invalid_exp_years"),
        ("ten", "invalid_exp_years"),
        ("senior", "invalid_exp_years"),
        (decimal.Decimal("2.5"), "invalid_exp_years"),
        (decimal.Decimal("NaN"), "invalid_exp_years"),
        ([3], "invalid_exp_years"),
    ],
)
def test_years_no_rule_turns_into_years_are_row_defects(raw: Any, kind: str) -> None:
    defects: dict[int, Any] = {}
    assert years_column([1, raw], "Exp Years", defects) == [1, None]
    [defect] = defects[1]
    assert (defect.column, defect.kind) == ("Exp Years", kind)
    assert "'Exp Years'" in defect.message
    json.dumps(defect.value, allow_nan=False)  # storable as JSONB


def test_int64_column_with_pd_na_loads(tmp_path: Path) -> None:
    frame = make_sample(4, dimension=4, layout="seed")
    frame["Exp Years"] = pd.array([1, None, 3, 4], dtype="Int64")
    frame.to_pickle(tmp_path / "f.pkl")
    data = load_dataset(tmp_path / "f.pkl")
    assert sorted(data.exp_years, key=lambda v: -1 if v is None else v) == [None, 1, 3, 4] and not data.defects


def test_text_cells() -> None:
    defects: dict[int, Any] = {}
    stamp = pd.Timestamp("2024-01-01")
    values = ["ok", None, pd.NA, float("nan"), pd.NaT, 17, 3.0, 2.5, True, b"x", ["l"], stamp, "a\ud800", "x" * (MAX_TEXT_LENGTH + 1)]  # fmt: skip
    out = text_column(values, "Primary Keyword", defects)
    assert out == ["ok", None, None, None, None, "17", "3", None, None, None, None, None, None, None]
    kinds = {i: d[0].kind for i, d in defects.items()}
    assert kinds == {7: "not_text", 8: "not_text", 9: "not_text", 10: "not_text", 11: "not_text",
                     12: "unencodable_text", 13: "text_too_long"}  # fmt: skip
    assert defects[12][0].value == {"type": "str", "repr": repr("a\ud800")}
    assert defects[13][0].value == "x" * (MAX_TEXT_LENGTH + 1)  # small enough to keep whole


def test_vector_cells_of_any_real_dtype_and_the_rest_as_defects() -> None:
    base = np.arange(4, dtype=np.float32) / 3
    good = [base, tuple(base.tolist()), base.tolist(), base.astype(np.float64), np.arange(4), np.arange(4, dtype=np.uint8),
            base.astype(np.float16)]  # fmt: skip
    bad = ["0.1, 0.2", [1.0, "x"], {"a": 1}, [[1.0], [2.0, 3.0]], [[1.0, 2.0], [3.0, 4.0]], [True, False],
           np.array([1j, 2j]), np.ones(MAX_VECTOR_BYTES // 4 + 1, np.float32)]  # fmt: skip
    defects: dict[int, Any] = {}
    out = vector_column([*good, *bad, None], "job_post_vectors", defects)
    for i, raw in enumerate(good):
        assert out[i].dtype == np.float32 and out[i].tobytes() == np.asarray(raw, dtype=np.float32).tobytes()
    assert sorted(defects) == list(range(len(good), len(good) + len(bad)))
    assert all(out[i].size == 0 for i in defects) and out[-1].size == 0  # None: a missing vector
    assert defects[len(good) + len(bad) - 1][0].kind == "vector_too_large"
    assert defects[len(good) + len(bad) - 1][0].value["length"] == MAX_VECTOR_BYTES // 4 + 1
    assert {d[0].kind for i, d in defects.items() if i < len(good) + len(bad) - 1} == {"invalid_vector"}


def test_cell_json_summarises_large_values() -> None:
    big = cell_json("é" * 5_000_000)
    assert big["length"] == 5_000_000 and big["summarised"] and len(big["prefix"]) == 200
    assert cell_json(float("-inf")) == {"type": "float", "repr": "-inf"}
    assert cell_json("nul\x00") == {"type": "str", "repr": repr("nul\x00")}


def test_ids_of_any_uuid_version_and_as_uuid_objects(tmp_path: Path) -> None:
    frame = make_sample(6, dimension=4, layout="seed").astype({"id": object})
    raw = [uuid.uuid1(), uuid.uuid3(uuid.NAMESPACE_DNS, "a"), str(uuid.uuid4()).upper(), uuid.uuid5(uuid.NAMESPACE_DNS, "b"),
           "urn:uuid:" + str(uuid.uuid4()), "{" + str(uuid.uuid4()) + "}"]  # fmt: skip
    frame["id"] = raw  # type: ignore[assignment]
    frame.to_pickle(tmp_path / "f.pkl")
    data = load_dataset(tmp_path / "f.pkl")
    assert data.invalid_prefix == 0 and not data.defects
    assert sorted(data.ids) == data.ids and set(data.ids) == {str(uuid.UUID(str(r))) for r in raw}


def test_a_chunk_never_exceeds_the_message_limit(tmp_path: Path) -> None:
    frame = make_sample(600, dimension=384).astype({"Company Name": object, "Primary Keyword": object})
    for i in range(0, 600, 2):  # every other row holds as much text as the batch side stores
        frame.at[i, "Company Name"] = "é" * MAX_TEXT_LENGTH
        frame.at[i, "Primary Keyword"] = "東" * MAX_TEXT_LENGTH
    frame.at[7, "Company Name"] = "y" * 5_000_000
    frame.at[9, "job_post_vectors"] = np.ones(1_200_000, np.float32)  # type: ignore[assignment]
    frame.to_pickle(tmp_path / "f.pkl")
    data = load_dataset(tmp_path / "f.pkl")
    messages = list(data.chunks(0, len(data), 300))
    sizes = [m.ByteSize() for m in messages]
    assert max(sizes) <= MAX_CHUNK_BYTES and len(messages) > 2
    rows = [r for m in messages for r in m.rows]
    assert [r.id for r in rows] == data.ids
    stubs = [decode_chunk(m) for m in messages]
    kinds = sorted(d[0].kind for c in stubs for d in c.defects.values())
    assert kinds == ["text_too_long", "vector_too_large"]


def _pickle(path: Path, frame: object) -> Path:
    with path.open("wb") as fh:
        pickle.dump(frame, fh)
    return path


def test_extra_columns_of_every_kind_are_ignored_and_named(tmp_path: Path) -> None:
    frame = make_sample(5, dimension=4)
    frame["When"] = pd.date_range("2024-01-01", periods=5)
    frame["How long"] = pd.to_timedelta(range(5), "s")
    frame["Month"] = pd.period_range("2024-01", periods=5, freq="M")
    frame["Band"] = pd.interval_range(0, 5)
    frame["Money"] = [decimal.Decimal(i) / 3 for i in range(5)]  # type: ignore[assignment]
    data = load_dataset(_pickle(tmp_path / "f.pkl", frame))
    assert data.ignored_columns[-5:] == ("When", "How long", "Month", "Band", "Money")
    assert "Published" in data.ignored_columns and len(data) == 5


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (make_sample(3, dimension=4).set_axis(["id", "id", *["c"] * 9], axis=1), "appear more than once"),
        (pd.DataFrame({"id": ["x"]}), "missing column(s)"),
        (make_sample(3, dimension=4).iloc[0:0], "the DataFrame has no rows"),
        ({"not": "a frame"}, "holds a dict, expected a pandas DataFrame"),
    ],
)
def test_file_level_errors_are_one_line_and_exit_1(tmp_path: Path, frame: object, expected: str) -> None:
    path = _pickle(tmp_path / "f.pkl", frame)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert expected in str(info.value) and "\n" not in str(info.value)
    result = subprocess.run(
        [sys.executable, "-m", "airflow_embedding_provider.cli", "ai-server", "--pkl", str(path), "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and expected in lines[0], result.stderr


def test_a_row_without_a_vector_travels_without_one(tmp_path: Path) -> None:
    frame = make_sample(4, dimension=4, layout="seed")
    frame["job_post_vectors"] = frame["job_post_vectors"].astype(object)
    frame.at[1, "job_post_vectors"] = []  # type: ignore[assignment]
    frame.at[2, "job_post_vectors"] = None
    frame.at[3, "job_post_vectors"] = "not a vector"
    data = load_dataset(_pickle(tmp_path / "f.pkl", frame))
    rows = decode_chunk(data.chunk(0, 4))
    by_id = dict(zip(rows.ids, rows.vectors, strict=True))
    for i in (1, 2, 3):
        assert by_id[str(frame.at[i, "id"])] == b""  # never the matrix's zeros
    assert len(by_id[str(frame.at[0, "id"])]) == 16
