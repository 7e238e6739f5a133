"""Load the ``.pkl`` once into columns, ordered by id, with the vectors as one float32 matrix.

Whole-file problems (not readable, not a DataFrame, a column missing, a column of the wrong
kind, no rows, a value the wire cannot carry such as ``Exp Years`` = "senior") raise
:class:`DatasetError` with one line that says what to fix. Problems of single rows that the wire
can carry (an id that is not a UUID, a vector of another length, NaN in a vector) do not stop the
server: those rows are served as they are, and the batch side puts them in its dead letter queue
with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import pickle
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from airflow_embedding_provider.ai_server import safe_pickle
from airflow_embedding_provider.rows import PKL_COLUMNS, FloatMatrix
from airflow_embedding_provider.wire.codec import encode_rows
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes

INT32_MAX = 2**31 - 1
# Experience values as recruiting data writes them: "3", "3y", "3 yrs", "3 years".
_YEARS = re.compile(r"^\s*(\d{1,9})\s*(?:y|yr|yrs|year|years)?\s*$", re.IGNORECASE)


class DatasetError(ValueError):
    """The file cannot be served at all; the message is one line for the user."""


@dataclass
class EmbeddingDataset:
    """Rows in id order. Rows whose id is not a UUID come first, in file order, and are served
    only to a stream that starts from the beginning (they cannot be placed after any UUID).

    :param keys: 16-byte big-endian UUID keys of the rows after the invalid-id prefix, sorted;
        PostgreSQL orders ``uuid`` the same way, so checkpoints agree with the server's order.
    :param vectors: float32 matrix of the rows whose vector has ``dimension`` values.
    :param odd_vectors: raw float32 bytes for rows whose vector has another length.
    """

    ids: list[str]
    keys: np.ndarray
    invalid_prefix: int
    company_name: list[str | None]
    exp_years: list[int | None]
    english_level: list[str | None]
    primary_keyword: list[str | None]
    vectors: FloatMatrix
    odd_vectors: dict[int, bytes] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])

    def start_after(self, last_processed_uuid: str) -> int:
        """Index of the first row strictly after ``last_processed_uuid`` ('' = the first row)."""
        if not last_processed_uuid:
            return 0
        key = np.frombuffer(uuid.UUID(last_processed_uuid).bytes, dtype="S16")[0]
        return self.invalid_prefix + int(np.searchsorted(self.keys, key, side="right"))

    def stop_at(self, until_uuid: str) -> int:
        """Index after the last row whose id is at most ``until_uuid`` ('' = after the last row)."""
        if not until_uuid:
            return len(self.ids)
        key = np.frombuffer(uuid.UUID(until_uuid).bytes, dtype="S16")[0]
        return self.invalid_prefix + int(np.searchsorted(self.keys, key, side="right"))

    def boundary(self, index: int) -> int:
        """``index`` moved forward past copies of the id before it, so that a chunk or partition
        boundary never separates two rows with the same id (a resume "after id X" would skip the
        later copy)."""
        pos = index - self.invalid_prefix
        if pos <= 0 or pos >= len(self.keys):
            return index
        return self.invalid_prefix + int(np.searchsorted(self.keys, self.keys[pos - 1], side="right"))

    def plan(self, start: int, rows_per_partition: int, max_partitions: int) -> list[tuple[int, int]]:
        """Contiguous ``[begin, end)`` ranges from ``start`` to the end: ``ceil(rows /
        rows_per_partition)`` of them, at most ``max_partitions``, of about equal size."""
        remaining = len(self.ids) - start
        if remaining <= 0:
            return []
        count = max(1, min(max_partitions, -(-remaining // max(1, rows_per_partition))))
        size = -(-remaining // count)
        ranges: list[tuple[int, int]] = []
        begin = start
        while begin < len(self.ids):
            end = min(begin + size, len(self.ids))
            if begin < self.invalid_prefix:
                end = max(end, self.invalid_prefix + 1)  # an until bound must be a real id
            end = min(self.boundary(end), len(self.ids))
            ranges.append((begin, end))
            begin = end
        return ranges

    def chunks(self, start: int, stop: int, size: int) -> Iterator[RowChunkBytes]:
        """Messages of about ``size`` rows from ``start`` up to ``stop``, cut at :meth:`boundary`."""
        while start < stop:
            end = min(self.boundary(min(start + size, stop)), stop)
            yield self.chunk(start, end)
            start = end

    def chunk(self, start: int, stop: int) -> RowChunkBytes:
        vectors = self.vectors[start:stop]
        message = encode_rows(
            self.ids[start:stop],
            self.company_name[start:stop],
            self.exp_years[start:stop],
            self.english_level[start:stop],
            self.primary_keyword[start:stop],
            vectors,
        )
        for i in range(start, stop):
            if i in self.odd_vectors:
                message.rows[i - start].vector = self.odd_vectors[i]
        return message


PARQUET_SUFFIXES = (".parquet", ".pq")
VECTOR_COLUMN = PKL_COLUMNS[-1]
#: Rows of vectors a Parquet read decodes at once: beside the matrix, only one batch is in memory.
PARQUET_BATCH_ROWS = 65_536


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in PARQUET_SUFFIXES


def _read(path: Path, *, trust_pickle: bool, columns: list[str] | None = None) -> pd.DataFrame:
    """The file's frame: a pickle whole, a Parquet file's ``columns`` (all when None)."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the file is empty, expected a pickled pandas DataFrame")
    try:
        if _is_parquet(path):
            frame = _read_parquet_columns(path, columns)  # no code in the file format: the safe alternative
        else:
            frame = pd.read_pickle(path) if trust_pickle else safe_pickle.load(path)
    except safe_pickle.UnsafePickleError as exc:
        raise DatasetError(f"{path}: {exc}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        ModuleNotFoundError,
        IndexError,
        KeyError,
        OSError,
    ) as exc:
        kind = "Parquet file" if _is_parquet(path) else "pickle"
        raise DatasetError(f"{path}: not a readable {kind} ({type(exc).__name__}: {exc})") from None
    if not isinstance(frame, pd.DataFrame):
        raise DatasetError(
            f"{path}: holds a {type(frame).__name__}, expected a pandas DataFrame with columns {', '.join(PKL_COLUMNS)}"
        )
    missing = [c for c in PKL_COLUMNS if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
            f"found {', '.join(map(repr, map(str, frame.columns)))}"
        )
    if len(frame) == 0:
        raise DatasetError(f"{path}: the DataFrame has no rows")
    return frame


def _read_parquet_columns(path: Path, columns: list[str] | None) -> pd.DataFrame:
    """``columns`` of a Parquet file, with the vector column as a placeholder when it is not
    among them (:func:`_parquet_vectors` reads it); a file that lacks a design column comes back
    as an empty frame of its own column names, so that :func:`_read` names what is missing."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if columns is None:
        return pd.read_parquet(path)
    if any(c not in names for c in PKL_COLUMNS):
        return pd.DataFrame(columns=names)
    frame = pq.read_table(path, columns=columns).to_pandas()
    if VECTOR_COLUMN not in columns:
        frame[VECTOR_COLUMN] = pd.Series([None] * len(frame), dtype=object)  # read by _parquet_vectors
    return frame


def _parquet_vectors(path: Path, rows: int) -> tuple[FloatMatrix, dict[int, bytes]] | None:
    """The vector column of a Parquet file as a float32 matrix, read :data:`PARQUET_BATCH_ROWS`
    rows at a time, when every row is a list of ``dimension`` numbers (no nulls); ``None`` for
    any other file, which then takes the same per-cell path as a pickle."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = pq.ParquetFile(path, buffer_size=8 * 1024 * 1024, pre_buffer=False)
    kind = source.schema_arrow.field(VECTOR_COLUMN).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        return None
    if not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        return None
    try:
        matrix = _fill_from_batches(source, kind, rows)
    finally:
        pa.default_memory_pool().release_unused()  # Arrow's allocator keeps freed batches otherwise
    return None if matrix is None else (matrix, {})


def _fill_from_batches(source: Any, kind: Any, rows: int) -> FloatMatrix | None:
    import pyarrow as pa

    matrix: FloatMatrix | None = None
    offset = 0
    for batch in source.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[VECTOR_COLUMN]):
        column = batch.column(0)
        if column.null_count or column.values.null_count:
            return None
        values = column.flatten().to_numpy(zero_copy_only=False)
        if pa.types.is_fixed_size_list(kind):
            dimension = kind.list_size
        else:
            lengths = np.diff(column.offsets.to_numpy())
            dimension = int(lengths[0]) if len(lengths) else 0
            if len(lengths) and not (lengths == dimension).all():
                return None
        if matrix is None:
            if dimension == 0:
                return None
            matrix = np.empty((rows, dimension), dtype=np.float32)
        if dimension != matrix.shape[1] or offset + len(column) > rows:
            return None
        matrix[offset : offset + len(column)] = values.reshape(len(column), dimension)
        offset += len(column)
    return matrix if offset == rows else None


def _stack_releasing(cells: list[Any], path: Path) -> tuple[FloatMatrix, dict[int, bytes]]:
    """:func:`_vectors` of the column ``cells`` for the common file whose every cell is a 1-D float numpy
    array of one length, copied into the matrix a batch at a time with each batch's arrays freed
    at once, so that the per-row arrays and the matrix are not both whole in memory (they were:
    the pickle path peaked at 3.9x the matrix, see bench/RESULTS.md). Any other column goes to
    :func:`_vectors`.
    ``cells`` must be the only reference to the arrays (the frame deleted), and is emptied."""
    first = cells[0] if cells else None
    dimension = first.shape[0] if isinstance(first, np.ndarray) and first.ndim == 1 else 0
    plain = dimension > 0 and all(
        type(v) is np.ndarray and v.ndim == 1 and v.shape[0] == dimension and v.dtype.kind == "f" for v in cells
    )
    if not plain:
        return _vectors(pd.Series(cells, dtype=object), path)[:2]
    matrix: FloatMatrix = np.empty((len(cells), dimension), dtype=np.float32)
    for start in range(0, len(cells), PARQUET_BATCH_ROWS):
        stop = min(start + PARQUET_BATCH_ROWS, len(cells))
        matrix[start:stop] = np.stack(cells[start:stop])
        cells[start:stop] = [None] * (stop - start)
        _trim()
    return matrix, {}


def _reorder_rows(matrix: FloatMatrix, order: list[int]) -> FloatMatrix:
    """``matrix[order]`` computed in place, one cycle of the permutation at a time: a copy
    would be a second matrix at the peak of the load."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start] or order[start] == start:
            continue
        held = matrix[start].copy()
        at = start
        while True:
            done[at] = True
            source = order[at]
            if source == start:
                matrix[at] = held
                break
            matrix[at] = matrix[source]
            at = source
    return matrix


def _text(values: pd.Series, column: str, path: Path) -> list[str | None]:
    out: list[str | None] = []
    for i, v in enumerate(values.tolist()):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(None)
        elif isinstance(v, str):
            out.append(v)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out.append(str(v))  # a numeric keyword such as 1C stays text
        else:
            raise DatasetError(f"{path}: column {column!r} row {i} holds a {type(v).__name__}, expected text")
    return out


def _years(values: pd.Series, path: Path) -> list[int | None]:
    out: list[int | None] = []
    for i, v in enumerate(values.tolist()):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(None)
            continue
        years: int | None = None
        if (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) or (
            isinstance(v, (float, np.floating)) and float(v).is_integer()
        ):
            years = int(v)
        elif isinstance(v, str) and (m := _YEARS.match(v)):
            years = int(m.group(1))
        if years is None or not -INT32_MAX <= years <= INT32_MAX:
            raise DatasetError(
                f"{path}: column 'Exp Years' row {i} holds {v!r}, expected a whole number "
                "of years (3, 3.0, '3y' and '3 years' are accepted)"
            )
        out.append(years)
    return out


def _vectors(values: pd.Series, path: Path) -> tuple[FloatMatrix, dict[int, bytes], np.ndarray]:
    """The common-length vectors as a matrix, other lengths as raw bytes."""
    raw = values.tolist()
    try:
        matrix = np.asarray(np.stack(raw), dtype=np.float32)  # fast path: all one length
        if matrix.ndim == 2 and matrix.shape[1] > 0:
            return np.ascontiguousarray(matrix), {}, np.ones(len(raw), dtype=bool)
    except (ValueError, TypeError):
        pass
    arrays: list[np.ndarray] = []
    for i, v in enumerate(raw):
        try:
            a = np.asarray(v if v is not None else [], dtype=np.float32).ravel()
        except (ValueError, TypeError):
            raise DatasetError(
                f"{path}: column 'job_post_vectors' row {i} holds {type(v).__name__} "
                f"{str(v)[:40]!r}, expected a list of floats"
            ) from None
        arrays.append(a)
    dimension = Counter(a.size for a in arrays if a.size).most_common(1)
    if not dimension:
        raise DatasetError(f"{path}: column 'job_post_vectors' has no non-empty vector")
    dim = dimension[0][0]
    fits = np.array([a.size == dim for a in arrays])
    matrix = np.zeros((len(arrays), dim), dtype=np.float32)
    odd: dict[int, bytes] = {}
    for i, a in enumerate(arrays):
        if fits[i]:
            matrix[i] = a
        else:
            odd[i] = a.astype("<f4").tobytes()
    return matrix, odd, fits


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _key(raw: Any) -> bytes | None:
    try:
        return uuid.UUID(str(raw)).bytes if raw is not None else None
    except ValueError:
        return None


log = logging.getLogger(__name__)
#: Files from this size on log each step of their load: a large one takes long enough to wonder.
PROGRESS_MIN_BYTES = 32 * 1024 * 1024


class _LoadProgress:
    """Logs the steps of loading a big file with the seconds so far; silent for small files."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.monotonic()
        size = path.stat().st_size if path.is_file() else 0
        self.enabled = size >= PROGRESS_MIN_BYTES
        self.step(f"loading {path} ({size / 2**20:,.0f} MiB)")

    def step(self, message: str) -> None:
        if self.enabled:
            log.info("%s [%.1f s]", message, time.monotonic() - self.started)


def load_dataset(path: str | Path, *, trust_pickle: bool = False) -> EmbeddingDataset:
    """Read and order the file; raises :class:`DatasetError` when it cannot be served.

    :param path: a pickled DataFrame, or a Parquet file (``.parquet``/``.pq``).
    :param trust_pickle: load any pickle, which can run code; by default only plain pandas/numpy
        data is unpickled (:mod:`safe_pickle`).
    """
    path = Path(path)
    progress = _LoadProgress(path)
    parquet = _is_parquet(path)
    metadata = [c for c in PKL_COLUMNS if c != VECTOR_COLUMN]
    frame = _read(path, trust_pickle=trust_pickle, columns=metadata if parquet else None)
    progress.step(f"read {len(frame):,} rows")
    company = _text(frame["Company Name"], "Company Name", path)
    english = _text(frame["English Level"], "English Level", path)
    keyword = _text(frame["Primary Keyword"], "Primary Keyword", path)
    years = _years(frame["Exp Years"], path)
    progress.step("checked the metadata columns")
    streamed = _parquet_vectors(path, len(frame)) if parquet else None
    if streamed is None and parquet:
        frame[VECTOR_COLUMN] = _read(path, trust_pickle=False, columns=[VECTOR_COLUMN, *metadata])[VECTOR_COLUMN]
    raw_ids = frame["id"].tolist()
    cells = frame[VECTOR_COLUMN].tolist() if streamed is None else []
    # The frame's per-row vector arrays are the largest thing alive: from here on only `cells`
    # holds them, and _stack_releasing frees them as it copies them into the matrix.
    del frame
    matrix, odd = streamed if streamed is not None else _stack_releasing(cells, path)
    del cells
    progress.step(f"packed {len(matrix):,} vectors of dimension {matrix.shape[1]}")
    keys = [_key(v) for v in raw_ids]
    invalid = [i for i, k in enumerate(keys) if k is None]
    valid = [i for i, k in enumerate(keys) if k is not None]
    valid_keys = np.array([keys[i] for i in valid], dtype="S16")
    order = invalid + [valid[j] for j in np.argsort(valid_keys, kind="stable")]
    # A missing id (None, or NaN once pandas mixed it into a column) travels as "" ("id is missing").
    ids = [
        ("" if _missing(raw_ids[i]) else str(raw_ids[i])) if keys[i] is None else str(uuid.UUID(bytes=keys[i]))
        for i in order
    ]
    position = {old: new for new, old in enumerate(order)}
    del raw_ids, keys
    _return_freed_memory()
    dataset = EmbeddingDataset(
        ids=ids,
        keys=np.sort(valid_keys, kind="stable"),
        invalid_prefix=len(invalid),
        company_name=_shared([company[i] for i in order]),
        exp_years=[years[i] for i in order],
        english_level=_shared([english[i] for i in order]),
        primary_keyword=_shared([keyword[i] for i in order]),
        vectors=np.ascontiguousarray(_reorder_rows(matrix, order)),
        odd_vectors={position[i]: b for i, b in odd.items()},
    )
    del matrix
    _return_freed_memory()
    progress.step(f"ordered by id: {len(dataset):,} rows ready to serve")
    return dataset


def _shared(values: list[str | None]) -> list[str | None]:
    """One string object per distinct value: metadata repeats (levels, keywords, companies)."""
    seen: dict[str, str] = {}
    return [None if v is None else seen.setdefault(v, v) for v in values]


def _return_freed_memory() -> None:
    """Hand the loading's freed memory back to the OS (glibc keeps it otherwise), so the server's
    resident size is its data, not its peak."""
    gc.collect()
    _trim()


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
