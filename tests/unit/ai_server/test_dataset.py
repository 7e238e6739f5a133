from __future__ import annotations

import itertools
import pickle
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airflow_embedding_provider.ai_server.dataset import DatasetError, load_dataset
from airflow_embedding_provider.digest import HASH_VERSION, row_hash
from airflow_embedding_provider.wire.codec import decode_chunk
from dev.sample import ENGLISH_LEVELS, make_sample


def _write(tmp_path: Path, frame: object, name: str = "data.pkl") -> Path:
    path = tmp_path / name
    with path.open("wb") as fh:
        pickle.dump(frame, fh)
    return path


def test_rows_are_ordered_by_id_and_columns_kept(tmp_path: Path) -> None:
    frame = make_sample(500, dimension=16, seed=3, layout="seed")
    data = load_dataset(_write(tmp_path, frame))
    assert data.ids == sorted(frame["id"])
    assert data.dimension == 16 and data.vectors.dtype == np.float32
    by_id = frame.set_index("id")
    for i in (0, 17, 499):
        src = by_id.loc[data.ids[i]]
        assert (data.company_name[i], data.exp_years[i], data.english_level[i], data.primary_keyword[i]) == (
            src["Company Name"],
            src["Exp Years"],
            src["English Level"],
            src["Primary Keyword"],
        )
        assert data.vectors[i].tobytes() == np.asarray(src["job_post_vectors"], np.float32).tobytes()


def test_sample_has_uuid7_ids_realistic_values_and_unit_vectors() -> None:
    frame = make_sample(300, seed=5, ids="uuid7")
    assert {uuid.UUID(i).version for i in frame["id"]} == {7}
    assert frame["id"].is_unique
    assert set(frame["English Level"]) <= set(ENGLISH_LEVELS)
    assert any(not name.isascii() for name in frame["Company Name"])
    norms = np.linalg.norm(np.stack(frame["job_post_vectors"].tolist()), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-5)


def test_start_after_is_strictly_after(tmp_path: Path) -> None:
    data = load_dataset(_write(tmp_path, make_sample(100, dimension=4)))
    assert data.start_after("") == 0
    assert data.start_after(data.ids[41]) == 42
    assert data.start_after(data.ids[-1]) == 100
    assert data.start_after("00000000-0000-0000-0000-000000000000") == 0
    with pytest.raises(ValueError):
        data.start_after("nope")


def test_row_level_problems_are_kept_for_the_dead_letter_queue(tmp_path: Path) -> None:
    frame = make_sample(10, dimension=4, layout="seed")
    frame.loc[2, "id"] = "not-a-uuid"
    frame.at[3, "job_post_vectors"] = np.array([1.0, 2.0])  # type: ignore[assignment]
    frame["Exp Years"] = frame["Exp Years"].astype(object)
    frame.loc[4, "Exp Years"] = "7 years"
    frame.loc[5, "Company Name"] = None
    data = load_dataset(_write(tmp_path, frame))
    assert data.invalid_prefix == 1 and data.ids[0] == "not-a-uuid"
    odd = data.ids.index(str(frame.loc[3, "id"]))
    assert data.odd_vectors == {odd: np.array([1.0, 2.0], "<f4").tobytes()}
    assert data.exp_years[data.ids.index(str(frame.loc[4, "id"]))] == 7
    assert data.company_name[data.ids.index(str(frame.loc[5, "id"]))] is None
    message = data.chunk(0, 10)
    assert message.rows[odd].vector == np.array([1.0, 2.0], "<f4").tobytes()


def test_each_message_carries_the_hash_of_each_row_as_it_is_served(tmp_path: Path) -> None:
    frame = make_sample(12, dimension=4, layout="seed")
    frame.loc[2, "id"] = "not-a-uuid"
    frame.at[3, "job_post_vectors"] = np.array([1.0, 2.0])  # type: ignore[assignment]
    frame.loc[7, "id"] = str(frame.at[8, "id"])  # one id twice: both copies are served
    data = load_dataset(_write(tmp_path, frame))
    for message in (data.chunk(0, 12), data.message_of([11, 0, 5]), *data.chunks(0, 12, 5)):
        chunk = decode_chunk(message)
        expected = [
            row_hash(
                r.id,
                chunk.company_name[k],
                chunk.exp_years[k],
                chunk.english_level[k],
                chunk.primary_keyword[k],
                chunk.vectors[k],
            )
            for k, r in enumerate(message.rows)
        ]
        assert message.hash_version == HASH_VERSION
        assert chunk.row_hashes is not None and chunk.row_hashes.tolist() == expected
    # A peer on another definition (or none) sends hashes this side does not read.
    message = data.chunk(0, 12)
    message.hash_version = "another"
    assert decode_chunk(message).row_hashes is None


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda p: p.write_bytes(b""), "the file is empty"),
        (lambda p: p.write_text("id,Company Name\n1,x\n"), "not a readable pickle"),
        (lambda p: _write(p.parent, [1, 2, 3], p.name), "holds a list, expected a pandas DataFrame"),
        (
            lambda p: _write(p.parent, make_sample(3, dimension=4).drop(columns=["English Level"]), p.name),
            "missing column(s) 'English Level'",
        ),
        (lambda p: _write(p.parent, make_sample(3, dimension=4).iloc[0:0], p.name), "the DataFrame has no rows"),
        (
            lambda p: _write(p.parent, make_sample(3, dimension=4).assign(job_post_vectors=["abc"] * 3), p.name),
            "column 'job_post_vectors' has no non-empty vector",
        ),
        (
            lambda p: _write(p.parent, make_sample(3, dimension=4).set_axis(["id"] * 2 + ["x"] * 9, axis=1), p.name),
            "column(s) 'id', 'x' appear more than once",
        ),
    ],
)
def test_bad_files_give_one_clear_error(tmp_path: Path, make, expected: str) -> None:
    path = tmp_path / "bad.pkl"
    make(path)
    with pytest.raises(DatasetError, match=None) as info:
        load_dataset(path)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "absent.pkl")


def test_cli_prints_one_error_line_and_exits_1(tmp_path: Path) -> None:
    bad = _write(tmp_path, pd.DataFrame({"id": ["x"]}))
    result = subprocess.run(
        [sys.executable, "-m", "airflow_embedding_provider.cli", "ai-server", "--pkl", str(bad), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("airflow-embedding ai-server: error:") and "missing column(s)" in lines[0]


def test_plan_covers_every_row_in_contiguous_ranges(tmp_path: Path) -> None:
    data = load_dataset(_write(tmp_path, make_sample(1000, dimension=4)))
    ranges = data.plan(0, rows_per_partition=300, max_partitions=64)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert len(ranges) == 4
    assert data.plan(0, rows_per_partition=10, max_partitions=3) == [(0, 334), (334, 668), (668, 1000)]
    assert data.plan(990, rows_per_partition=300, max_partitions=64) == [(990, 1000)]
    assert data.plan(1000, rows_per_partition=300, max_partitions=64) == []


def test_boundaries_never_split_copies_of_one_id(tmp_path: Path) -> None:
    frame = make_sample(10, dimension=4)
    frame = pd.concat([frame, frame.iloc[[4, 4]]], ignore_index=True)  # id 4 three times
    data = load_dataset(_write(tmp_path, frame))
    first = data.ids.index(str(frame.loc[4, "id"]))
    assert data.ids[first : first + 3] == [str(frame.loc[4, "id"])] * 3
    for cut in (first + 1, first + 2):
        assert data.boundary(cut) == first + 3
    assert data.boundary(first) == first
    for _begin, end in data.plan(0, rows_per_partition=2, max_partitions=64):
        assert end == len(data) or data.ids[end - 1] != data.ids[end]
    assert data.stop_at(data.ids[first]) == first + 3


class _RunsCode:
    """Unpickles into a call of os.system: what a malicious pickle looks like."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _write(tmp_path, _RunsCode(marker), "evil.pkl")
    with pytest.raises(DatasetError, match=r"refusing to load (posix|os)\.system") as info:
        load_dataset(path)
    assert "Parquet" in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    # Hidden inside a DataFrame cell, too.
    frame = make_sample(3, dimension=4)
    frame["Company Name"] = frame["Company Name"].astype(object)
    frame.at[1, "Company Name"] = _RunsCode(marker)  # type: ignore[assignment]
    with pytest.raises(DatasetError, match="refusing to load"):
        load_dataset(_write(tmp_path, frame, "evil-cell.pkl"))
    assert not marker.exists()


def test_pandas_eval_is_not_callable_from_a_pickle(tmp_path: Path) -> None:
    class _Eval:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (pd.eval, ("1 + 1",))

    with pytest.raises(DatasetError, match="refusing to load pandas"):
        load_dataset(_write(tmp_path, _Eval(), "eval.pkl"))


def test_parquet_loads_the_same_rows(tmp_path: Path) -> None:
    frame = make_sample(50, dimension=8)
    frame.to_parquet(tmp_path / "data.parquet")
    from_parquet = load_dataset(tmp_path / "data.parquet")
    from_pickle = load_dataset(_write(tmp_path, frame))
    assert from_parquet.ids == from_pickle.ids
    assert from_parquet.vectors.tobytes() == from_pickle.vectors.tobytes()
    assert from_parquet.company_name == from_pickle.company_name


def test_gzipped_and_older_protocol_pickles_load(tmp_path: Path) -> None:
    frame = make_sample(20, dimension=4)
    frame.to_pickle(tmp_path / "data.pkl.gz", compression="gzip", protocol=2)
    assert len(load_dataset(tmp_path / "data.pkl.gz")) == 20
