"""Frames in the design's layout with every kind of extra column a real file carries.

Plain pandas/numpy only (no project imports), so that ``pickles/make.py`` can run it under
other pandas and numpy versions to write the pickles kept in ``pickles/``.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import numpy as np
import pandas as pd


def rich_frame(rows: int = 24, dimension: int = 4) -> pd.DataFrame:
    """The six design columns plus dates (naive, UTC, a zone, microseconds), timedelta, Period,
    Interval, Decimal, pandas' string dtype with pd.NA, nullable Int64/Float64/boolean, a
    categorical, Timestamp/NaT cells and bytes/bool/list/... cells in object columns."""
    rng = np.random.default_rng(5)
    ids = [str(uuid.UUID(int=int(rng.integers(1, 2**62)) << 64 | i, version=4)) for i in range(rows)]
    frame = pd.DataFrame(
        {
            "id": ids,
            "Company Name": [f"Co {i}" for i in range(rows)],
            "Exp Years": [str(i % 5) + "y" for i in range(rows)],
            "English Level": ["upper"] * rows,
            "Primary Keyword": ["Python"] * rows,
            "job_post_vectors": list(rng.standard_normal((rows, dimension)).astype(np.float32)),
        }
    )
    frame["Published"] = pd.date_range("2024-01-01", periods=rows, freq="D")
    frame["published_utc"] = pd.date_range("2024-01-01", periods=rows, freq="h", tz="UTC")
    frame["published_kyiv"] = pd.date_range("2024-01-01", periods=rows, freq="h", tz="Europe/Kyiv")
    frame["published_us"] = pd.date_range("2024-01-01", periods=rows, freq="min", unit="us")
    frame["age"] = pd.to_timedelta(np.arange(rows), unit="h")
    frame["month"] = pd.period_range("2024-01", periods=rows, freq="M")
    frame["band"] = pd.arrays.IntervalArray.from_breaks(np.arange(rows + 1))
    frame["salary"] = pd.Series([decimal.Decimal(f"{1000 + i}.50") for i in range(rows)], dtype=object)
    frame["Long Description"] = pd.array([f"text {i}" if i % 3 else None for i in range(rows)], dtype="string")
    frame["Long Description_lang"] = pd.array(["en"] * rows, dtype="string[python]")
    frame["views"] = pd.array([i if i % 4 else None for i in range(rows)], dtype="Int64")
    frame["score"] = pd.array([i / 2 if i % 4 else None for i in range(rows)], dtype="Float64")
    frame["remote"] = pd.array([bool(i % 2) if i % 5 else None for i in range(rows)], dtype="boolean")
    frame["flag"] = np.arange(rows) % 2 == 0
    frame["rank"] = np.arange(rows, dtype=np.int32)
    frame["ratio"] = np.linspace(0, 1, rows)
    frame["Position"] = pd.Categorical([["dev", "qa", "ops"][i % 3] for i in range(rows)])
    frame["seen"] = pd.Series([pd.Timestamp("2024-05-01"), pd.NaT] * (rows // 2), dtype=object)
    frame["seen_tz"] = pd.Series([pd.Timestamp("2024-05-01", tz="UTC"), None] * (rows // 2), dtype=object)
    cells: list[object] = [
        b"raw",
        True,
        [1, 2],
        (3, 4),
        {"k": 1},
        1.5,
        7,
        None,
        dt.date(2024, 1, 2),
        dt.datetime(2024, 1, 2, 3, 4),
        dt.timedelta(days=1),
        uuid.UUID(int=5),
        pd.Timedelta(hours=3),
        pd.Period("2024-03", freq="M"),
        pd.Interval(0, 1),
        np.float64(2.5),
        np.int64(3),
        np.bool_(True),
        np.datetime64("2024-01-01"),
        pd.NA,
        decimal.Decimal("1.1"),
        np.float32(1.5),
        pd.Timestamp("2024-01-01", tz="Europe/Kyiv"),
        b"",
    ]
    assert len(cells) <= rows
    frame["mixed"] = pd.Series((cells * rows)[:rows], dtype=object)
    frame["__index_level_0__"] = np.arange(rows, dtype=np.int64) * 3
    return frame


def variants(rows: int = 24, dimension: int = 4) -> dict[str, pd.DataFrame]:
    """The rich frame in the shapes real files take: other indexes, object text, numeric years,
    a keyword column pandas made float64, list vectors, Arrow-backed text."""
    frame = rich_frame(rows, dimension)
    out = {"rich": frame}
    out["indexed_by_id"] = frame.set_index("id", drop=False).rename_axis(None)
    out["int_index"] = frame.set_index("__index_level_0__", drop=False).rename_axis(None)
    out["datetime_index"] = frame.set_index("Published", drop=False).rename_axis(None)
    out["object_text"] = frame.astype({c: object for c in ("id", "Company Name", "English Level", "Primary Keyword")})
    out["int_years"] = frame.assign(**{"Exp Years": np.arange(rows, dtype=np.int64)})
    out["nullable_years"] = frame.assign(**{"Exp Years": pd.array([1, None] * (rows // 2), dtype="Int64")})
    out["float_keyword"] = frame.assign(**{"Primary Keyword": [np.nan] + ["Go"] * (rows - 1)})
    out["list_vectors"] = frame.assign(
        job_post_vectors=pd.Series([list(map(float, v)) for v in frame["job_post_vectors"]])
    )
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        pass
    else:
        out["arrow_text"] = frame.astype({"Long Description": "string[pyarrow]", "Company Name": "string[pyarrow]"})
    return out
