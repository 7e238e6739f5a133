"""Load the ``.pkl`` once into columns, ordered by id, with the vectors as one float32 matrix.

Whole-file problems (not readable, not a DataFrame, a column missing or there twice, no rows)
raise :class:`DatasetError` with one line that says what to fix. A cell never does: a value the
wire cannot carry (see :mod:`cells` for what is accepted) makes its row *defective*; the row is
still served, marked with a ``RowDefect`` naming the column, the reason and the original value, so
that the batch side puts it in its dead letter queue. Rows the batch side can judge itself (an id
that is not a UUID, a vector of another length, NaN in a vector) are served as they are. Columns
beyond the six the design uses are ignored.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import pickle
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from airflow_embedding_provider.ai_server import safe_pickle
from airflow_embedding_provider.ai_server.cells import (
    MAX_VECTOR_BYTES,
    Defects,
    cell_json,
    encodable,
    is_missing,
    text_column,
    vector_column,
    years_column,
)
from airflow_embedding_provider.digest import HASH_BYTES, HASH_VERSION, Hashes, pack_hashes, row_hash, row_hashes
from airflow_embedding_provider.partitions import partition_count
from airflow_embedding_provider.rows import PKL_COLUMNS, CellDefect, FloatMatrix
from airflow_embedding_provider.validation import MAX_TEXT_LENGTH
from airflow_embedding_provider.wire.codec import MAX_CHUNK_BYTES, encode_rows
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes

log = logging.getLogger(__name__)


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
    :param defects: the cells of a row that cannot be served as the file has them, by row index.
    :param ignored_columns: the file's columns beyond the design's six.
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
    defects: dict[int, tuple[CellDefect, ...]] = field(default_factory=dict)
    ignored_columns: tuple[str, ...] = ()
    _bytes_bound: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _hashes: Hashes | None = field(default=None, init=False, repr=False, compare=False)
    _hashing: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def defect_counts(self) -> Counter[tuple[str, str]]:
        """Defective rows by (column, error kind) of their first defect."""
        return Counter((d[0].column, d[0].kind) for d in self.defects.values())

    def describe_defects(self) -> str:
        """One line for the start-up log: defective rows per column and reason, or none."""
        counts = self.defect_counts()
        if not counts:
            return "no defective rows"
        parts = ", ".join(f"{column!r} {kind}: {n}" for (column, kind), n in sorted(counts.items()))
        return f"{len(self.defects)} defective row(s), served marked for the DLQ: {parts}"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def row_hashes(self) -> Hashes:
        """Every row's hash (digest.py) over the values it is served with, computed once (about
        2 us a row): each message carries its rows' hashes, so the batch side need not hash them,
        and the range digests are sums of them."""
        with self._hashing:
            if self._hashes is None:
                hashes = row_hashes(
                    self.ids, self.company_name, self.exp_years, self.english_level, self.primary_keyword, self.vectors
                )
                for i, odd in self.odd_vectors.items():  # a vector of another length travels as its own bytes
                    hashes[i] = row_hash(
                        self.ids[i],
                        self.company_name[i],
                        self.exp_years[i],
                        self.english_level[i],
                        self.primary_keyword[i],
                        odd,
                    )
                self._hashes = hashes
            return self._hashes

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
        count = partition_count(remaining, rows_per_partition, max_partitions)
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
        """Messages of about ``size`` rows from ``start`` up to ``stop``, cut at :meth:`boundary`;
        a message over :data:`MAX_CHUNK_BYTES` (long texts) is cut again, so none exceeds it."""
        while start < stop:
            end = min(self.boundary(min(start + size, stop)), stop)
            yield from self._fitting(start, end)
            start = end

    def _upper_bound(self, start: int, stop: int) -> int:
        """At least the encoded size of rows ``[start, stop)`` (4 bytes a character, generous field
        overheads): a chunk under :data:`MAX_CHUNK_BYTES` by this needs no exact measuring."""
        if self._bytes_bound is None:
            n = len(self.ids)
            sizes = np.full(n, 64 + 4 * self.dimension + HASH_BYTES, dtype=np.int64)
            for column in (self.ids, self.company_name, self.english_level, self.primary_keyword):
                sizes += 4 * np.fromiter((len(t) if t else 0 for t in column), np.int64, n)
            for i, raw in self.odd_vectors.items():
                sizes[i] += len(raw) - 4 * self.dimension
            for i, marked in self.defects.items():
                sizes[i] += sum(64 + 4 * (len(d.message) + len(json.dumps(d.value))) for d in marked)
            self._bytes_bound = np.concatenate([[0], np.cumsum(sizes)])
        return int(self._bytes_bound[stop] - self._bytes_bound[start])

    def _fitting(self, start: int, stop: int) -> Iterator[RowChunkBytes]:
        message = self.chunk(start, stop)
        if self._upper_bound(start, stop) <= MAX_CHUNK_BYTES or message.ByteSize() <= MAX_CHUNK_BYTES:
            yield message
            return
        middle = self.boundary(start + (stop - start) // 2)
        if middle <= start or middle >= stop:  # one row, or copies of one id: cells are bounded
            yield message
            return
        yield from self._fitting(start, middle)
        yield from self._fitting(middle, stop)

    def chunk(self, start: int, stop: int) -> RowChunkBytes:
        """The rows ``[start, stop)`` as one message: odd vectors and defect marks as :meth:`_message`."""
        return self._message(
            range(start, stop),
            self.ids[start:stop],
            self.company_name[start:stop],
            self.exp_years[start:stop],
            self.english_level[start:stop],
            self.primary_keyword[start:stop],
            self.vectors[start:stop],
        )

    def message_of(self, positions: list[int]) -> RowChunkBytes:
        """:meth:`chunk` of the rows at ``positions`` (any rows, e.g. those a range sync asks for):
        odd vectors and defect marks as there."""
        return self._message(
            positions,
            [self.ids[i] for i in positions],
            [self.company_name[i] for i in positions],
            [self.exp_years[i] for i in positions],
            [self.english_level[i] for i in positions],
            [self.primary_keyword[i] for i in positions],
            self.vectors[np.asarray(positions, dtype=np.intp)],
        )

    def _message(
        self,
        positions: Sequence[int],
        ids: list[str],
        company_name: list[str | None],
        exp_years: list[int | None],
        english_level: list[str | None],
        primary_keyword: list[str | None],
        vectors: FloatMatrix,
    ) -> RowChunkBytes:
        """The rows at ``positions``, whose columns are given, encoded; a row whose vector has
        another length carries its own bytes, and a defective row its marks (:func:`_mark_row`)."""
        message = encode_rows(ids, company_name, exp_years, english_level, primary_keyword, vectors)
        message.row_hashes = pack_hashes(self.row_hashes[np.asarray(positions, dtype=np.intp)])
        message.hash_version = HASH_VERSION
        odd, defects = self.odd_vectors, self.defects
        if odd or defects:  # most files have neither: no look-up a row
            rows = message.rows
            for k, i in enumerate(positions):
                if i in odd:
                    rows[k].vector = odd[i]
                if i in defects:
                    _mark_row(rows[k], defects[i])
        return message


def _mark_row(row: Any, defects: tuple[CellDefect, ...]) -> None:
    """Attach the defects; the vector moves to ``held_vector``, which seed-text clients skip."""
    for d in defects:
        row.defects.add(
            column=d.column, error_kind=d.kind, message=d.message, value_json=json.dumps(d.value, ensure_ascii=False)
        )
    if row.vector:
        row.held_vector = row.vector
        row.ClearField("vector")


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
    duplicated = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
    if duplicated:
        raise DatasetError(
            f"{path}: column(s) {', '.join(map(repr, duplicated))} appear more than once; "
            "rename or drop the copies so that each column name is unique"
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
            if dimension == 0 or dimension * 4 > MAX_VECTOR_BYTES:
                return None  # oversized vectors: the per-cell path makes them defects
            matrix = np.empty((rows, dimension), dtype=np.float32)
        if dimension != matrix.shape[1] or offset + len(column) > rows:
            return None
        matrix[offset : offset + len(column)] = values.reshape(len(column), dimension)
        offset += len(column)
    return matrix if offset == rows else None


def _stack_releasing(cells: list[Any], path: Path, defects: Defects) -> tuple[FloatMatrix, dict[int, bytes]]:
    """The vector column ``cells`` as a matrix. The common file, whose every cell is a 1-D float
    numpy array of one length small enough to travel, is copied into the matrix a batch at a time
    with each batch's arrays freed at once, so that the per-row arrays and the matrix are not both
    whole in memory (they were: the pickle path peaked at 3.9x the matrix, see bench/RESULTS.md).
    Any other column goes cell by cell through :func:`cells.vector_column`, whose defects are
    recorded in ``defects``.
    ``cells`` must be the only reference to the arrays (the frame deleted), and is emptied."""
    first = cells[0] if cells else None
    dimension = first.shape[0] if isinstance(first, np.ndarray) and first.ndim == 1 else 0
    plain = 0 < dimension * 4 <= MAX_VECTOR_BYTES and all(
        type(v) is np.ndarray and v.ndim == 1 and v.shape[0] == dimension and v.dtype.kind == "f" for v in cells
    )
    if not plain:
        fast = _fast_vectors(cells)
        if fast is not None:
            return fast, {}
        return _vectors(vector_column(cells, VECTOR_COLUMN, defects), path)
    matrix: FloatMatrix = np.empty((len(cells), dimension), dtype=np.float32)
    for start in range(0, len(cells), PARQUET_BATCH_ROWS):
        stop = min(start + PARQUET_BATCH_ROWS, len(cells))
        with np.errstate(over="ignore", invalid="ignore"):
            matrix[start:stop] = np.stack(cells[start:stop])
        cells[start:stop] = [None] * (stop - start)
        _trim()
    return matrix, {}


def _column_names(path: Path, frame: pd.DataFrame, parquet: bool) -> list[str]:
    """Every column of the file: a Parquet read takes only the design's columns, so ask its schema."""
    if parquet:
        import pyarrow.parquet as pq

        return [str(c) for c in pq.read_schema(path).names]
    return [str(c) for c in frame.columns]


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


def _vectors(values: list[np.ndarray], path: Path) -> tuple[FloatMatrix, dict[int, bytes]]:
    """The common-length vectors as a matrix, other lengths as raw bytes (empty ones too: a row
    without a vector must travel without one, never as the matrix's zeros)."""
    dimension = Counter(a.size for a in values if a.size).most_common(1)
    if not dimension:
        raise DatasetError(f"{path}: column 'job_post_vectors' has no non-empty vector")
    dim = dimension[0][0]
    matrix = np.zeros((len(values), dim), dtype=np.float32)
    odd: dict[int, bytes] = {}
    for i, a in enumerate(values):
        if a.size == dim:
            matrix[i] = a
        else:
            odd[i] = a.astype("<f4").tobytes()
    return matrix, odd


def _fast_vectors(raw: list[Any]) -> FloatMatrix | None:
    """All vectors at once when they are one length of a real dtype (the common file), else None."""
    try:
        stacked = np.stack(raw)
    except (ValueError, TypeError):
        return None
    if stacked.ndim != 2 or stacked.shape[1] == 0 or stacked.dtype.kind not in "fiu":
        return None
    if stacked.shape[1] * 4 > MAX_VECTOR_BYTES:
        return None  # oversized vectors: the per-row path makes them defects
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(stacked, dtype=np.float32)


def _key(raw: Any) -> bytes | None:
    if isinstance(raw, uuid.UUID):
        return raw.bytes
    if not isinstance(raw, str):
        return None
    try:
        return uuid.UUID(raw).bytes
    except ValueError:
        return None


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


def _raw_id(raw: Any, row: int, defects: Defects) -> str:
    """The id as it travels when it is not a UUID: its text, so that the batch side names it in the
    DLQ, unless the text cannot travel (then "" and a defect with the original)."""
    if is_missing(raw):
        return ""  # "id is missing"
    text = raw if isinstance(raw, str) else str(raw)
    if len(text) > MAX_TEXT_LENGTH or not encodable(text):
        kind = "text_too_long" if len(text) > MAX_TEXT_LENGTH else "unencodable_text"
        message = f"column 'id' holds {type(raw).__name__} of {len(text)} characters that cannot travel as an id"
        defects.setdefault(row, []).append(CellDefect("id", kind, message, cell_json(raw)))
        return ""
    return text


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
    ignored = tuple(c for c in _column_names(path, frame, parquet) if c not in PKL_COLUMNS)
    defects: Defects = {}
    company = text_column(frame["Company Name"].tolist(), "Company Name", defects)
    english = text_column(frame["English Level"].tolist(), "English Level", defects)
    keyword = text_column(frame["Primary Keyword"].tolist(), "Primary Keyword", defects)
    years = years_column(frame["Exp Years"].tolist(), "Exp Years", defects)
    progress.step("checked the metadata columns")
    streamed = _parquet_vectors(path, len(frame)) if parquet else None
    if streamed is None and parquet:
        frame[VECTOR_COLUMN] = _read(path, trust_pickle=False, columns=[VECTOR_COLUMN, *metadata])[VECTOR_COLUMN]
    raw_ids = frame["id"].tolist()
    cells = frame[VECTOR_COLUMN].tolist() if streamed is None else []
    # The frame's per-row vector arrays are the largest thing alive: from here on only `cells`
    # holds them, and _stack_releasing frees them as it copies them into the matrix.
    del frame
    matrix, odd = streamed if streamed is not None else _stack_releasing(cells, path, defects)
    del cells
    progress.step(f"packed {len(matrix):,} vectors of dimension {matrix.shape[1]}")
    keys = [_key(v) for v in raw_ids]
    invalid = [i for i, k in enumerate(keys) if k is None]
    valid = [i for i, k in enumerate(keys) if k is not None]
    valid_keys = np.array([keys[i] for i in valid], dtype="S16")
    order = invalid + [valid[j] for j in np.argsort(valid_keys, kind="stable")]
    # A missing id (None, or NaN once pandas mixed it into a column) travels as "" ("id is missing").
    ids = [_raw_id(raw_ids[i], i, defects) if keys[i] is None else str(uuid.UUID(bytes=keys[i])) for i in order]
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
        defects={position[i]: tuple(d) for i, d in defects.items()},
        ignored_columns=ignored,
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
