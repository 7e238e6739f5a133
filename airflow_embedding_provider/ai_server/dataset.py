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
import uuid
from collections import Counter
from collections.abc import Iterator
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
            sizes = np.full(n, 64 + 4 * self.dimension, dtype=np.int64)
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
        if self.defects:
            for i in range(start, stop):
                if i in self.defects:
                    _mark_row(message.rows[i - start], self.defects[i])
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


def _read(path: Path, *, trust_pickle: bool) -> pd.DataFrame:
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: the file is empty, expected a pickled pandas DataFrame")
    try:
        if path.suffix.lower() in PARQUET_SUFFIXES:
            frame = pd.read_parquet(path)  # no code in the file format: the safe alternative
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
        kind = "Parquet file" if path.suffix.lower() in PARQUET_SUFFIXES else "pickle"
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
    frame = _read(path, trust_pickle=trust_pickle)
    ignored = tuple(str(c) for c in frame.columns if c not in PKL_COLUMNS)
    defects: Defects = {}
    company = text_column(frame["Company Name"].tolist(), "Company Name", defects)
    english = text_column(frame["English Level"].tolist(), "English Level", defects)
    keyword = text_column(frame["Primary Keyword"].tolist(), "Primary Keyword", defects)
    years = years_column(frame["Exp Years"].tolist(), "Exp Years", defects)
    raw_vectors = frame["job_post_vectors"].tolist()
    fast = _fast_vectors(raw_vectors)
    odd: dict[int, bytes] = {}
    if fast is not None:
        matrix = fast
    else:
        matrix, odd = _vectors(vector_column(raw_vectors, "job_post_vectors", defects), path)
    del raw_vectors
    raw_ids = frame["id"].tolist()
    keys = [_key(v) for v in raw_ids]
    invalid = [i for i, k in enumerate(keys) if k is None]
    valid = [i for i, k in enumerate(keys) if k is not None]
    valid_keys = np.array([keys[i] for i in valid], dtype="S16")
    order = invalid + [valid[j] for j in np.argsort(valid_keys, kind="stable")]
    # A missing id (None, or NaN once pandas mixed it into a column) travels as "" ("id is missing").
    ids = [_raw_id(raw_ids[i], i, defects) if keys[i] is None else str(uuid.UUID(bytes=keys[i])) for i in order]
    position = {old: new for new, old in enumerate(order)}
    # The frame's per-row vector arrays are the largest thing alive: gone before the reordered copy.
    del frame, raw_ids, keys
    dataset = EmbeddingDataset(
        ids=ids,
        keys=np.sort(valid_keys, kind="stable"),
        invalid_prefix=len(invalid),
        company_name=_shared([company[i] for i in order]),
        exp_years=[years[i] for i in order],
        english_level=_shared([english[i] for i in order]),
        primary_keyword=_shared([keyword[i] for i in order]),
        vectors=np.ascontiguousarray(matrix[np.asarray(order, dtype=np.intp)]),
        odd_vectors={position[i]: b for i, b in odd.items()},
        defects={position[i]: tuple(d) for i, d in defects.items()},
        ignored_columns=ignored,
    )
    del matrix
    _return_freed_memory()
    return dataset


def _shared(values: list[str | None]) -> list[str | None]:
    """One string object per distinct value: metadata repeats (levels, keywords, companies)."""
    seen: dict[str, str] = {}
    return [None if v is None else seen.setdefault(v, v) for v in values]


def _return_freed_memory() -> None:
    """Hand the loading's freed memory back to the OS (glibc keeps it otherwise), so the server's
    resident size is its data, not its peak."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
