"""Parquet input: streamed by batches when it is plain, the same rows as the pickle path always."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from airflow_embedding_provider.ai_server.dataset import (
    PARQUET_BATCH_ROWS,
    DatasetError,
    EmbeddingDataset,
    _parquet_vectors,
    _reorder_rows,
    load_dataset,
)
from dev.sample import make_sample


def _same(a: EmbeddingDataset, b: EmbeddingDataset) -> None:
    assert a.ids == b.ids and a.invalid_prefix == b.invalid_prefix
    assert a.keys.tobytes() == b.keys.tobytes()
    assert (a.company_name, a.exp_years, a.english_level, a.primary_keyword) == (
        b.company_name,
        b.exp_years,
        b.english_level,
        b.primary_keyword,
    )
    assert a.vectors.dtype == b.vectors.dtype == np.float32 and a.vectors.flags.c_contiguous
    assert a.vectors.tobytes() == b.vectors.tobytes()
    assert a.odd_vectors == b.odd_vectors


def test_a_file_of_several_batches_streams_to_the_same_rows_as_its_pickle(tmp_path: Path) -> None:
    rows = 2 * PARQUET_BATCH_ROWS + 123
    frame = make_sample(rows, dimension=4, seed=9)
    frame.to_parquet(tmp_path / "data.parquet", row_group_size=PARQUET_BATCH_ROWS // 2)
    frame.to_pickle(tmp_path / "data.pkl")
    streamed = _parquet_vectors(tmp_path / "data.parquet", rows)
    assert streamed is not None  # a plain file takes the streaming path
    assert streamed[0].tobytes() == np.stack(frame["job_post_vectors"].tolist()).tobytes()  # file order
    _same(load_dataset(tmp_path / "data.parquet"), load_dataset(tmp_path / "data.pkl"))


def test_odd_and_missing_vectors_take_the_per_cell_path_with_the_same_result(tmp_path: Path) -> None:
    frame = make_sample(40, dimension=4)
    frame["job_post_vectors"] = frame["job_post_vectors"].astype(object)
    frame.at[3, "job_post_vectors"] = np.array([1.0, 2.0], dtype=np.float32)  # type: ignore[assignment]
    frame.at[7, "job_post_vectors"] = None
    frame.loc[5, "id"] = "not-a-uuid"
    frame.to_parquet(tmp_path / "odd.parquet")
    frame.to_pickle(tmp_path / "odd.pkl")
    assert _parquet_vectors(tmp_path / "odd.parquet", len(frame)) is None
    from_parquet = load_dataset(tmp_path / "odd.parquet")
    _same(from_parquet, load_dataset(tmp_path / "odd.pkl"))
    assert len(from_parquet.odd_vectors) == 2 and from_parquet.ids[0] == "not-a-uuid"


def test_float64_and_fixed_size_vectors_stream_as_float32(tmp_path: Path) -> None:
    import pyarrow as pa

    frame = make_sample(30, dimension=3)
    vectors = np.stack(frame["job_post_vectors"].tolist())
    for name, column in {
        "f64": pa.array(list(vectors.astype(np.float64)), type=pa.list_(pa.float64())),
        "fixed": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 3),
    }.items():
        table = pa.Table.from_pandas(frame.drop(columns=["job_post_vectors"]), preserve_index=False)
        pq.write_table(table.append_column("job_post_vectors", column), tmp_path / f"{name}.parquet")
        streamed = _parquet_vectors(tmp_path / f"{name}.parquet", len(frame))
        assert streamed is not None and streamed[0].tobytes() == vectors.astype(np.float32).tobytes(), name
        assert len(load_dataset(tmp_path / f"{name}.parquet")) == 30


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda p: make_sample(3, dimension=4).drop(columns=["English Level"]).to_parquet(p),
            "missing column(s) 'English Level'",
        ),
        (lambda p: make_sample(3, dimension=4).iloc[0:0].to_parquet(p), "the DataFrame has no rows"),
        (lambda p: p.write_bytes(b"PAR1 not really"), "not a readable Parquet file"),
    ],
)
def test_bad_parquet_files_give_one_clear_error(tmp_path: Path, make, expected: str) -> None:
    path = tmp_path / "bad.parquet"
    make(path)
    with pytest.raises(DatasetError) as info:
        load_dataset(path)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_rows_are_reordered_in_place_exactly_as_by_indexing() -> None:
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((1000, 5)).astype(np.float32)
    for order in (list(rng.permutation(1000)), list(range(1000)), [*range(1, 1000), 0]):
        expected = matrix[np.asarray(order)]
        work = matrix.copy()
        assert _reorder_rows(work, [int(i) for i in order]) is work
        assert work.tobytes() == expected.tobytes()


def test_the_sample_command_writes_real_parquet_that_the_server_loads(tmp_path: Path) -> None:
    out = tmp_path / "sample.parquet"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "dev",
            "sample",
            "--rows",
            "300",
            "--dim",
            "8",
            "--out",
            str(out),
            "--no-odd-cell",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:4] == b"PAR1"
    table = pq.read_table(out)
    assert table.num_rows == 300 and table.column_names == list(make_sample(1, dimension=8).columns)
    frame = make_sample(300, dimension=8)
    frame.to_pickle(tmp_path / "sample.pkl")
    _same(load_dataset(out), load_dataset(tmp_path / "sample.pkl"))
