"""Range digests and id listings over a loaded :class:`EmbeddingDataset` (range sync).

Counted are the rows the batch side can place in the id order: those whose id is a UUID, each id
once with its last copy in the file (the copy the batch side keeps, ``storage/writer.py``:
``keep_last_occurrence``). Rows whose id is not a UUID are in no range: the batch side
dead-letters them and cannot look them up by id.

The hashes are the dataset's (computed once, :attr:`EmbeddingDataset.row_hashes`), kept with
prefix sums, so a range's digest costs two lookups however many rows it holds.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.digest import Hashes, RangeDigest
from airflow_embedding_provider.wire.codec import MAX_CHUNK_BYTES
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes


@dataclass(frozen=True)
class _Index:
    rows: npt.NDArray[np.intp]  # dataset positions of the counted rows, ascending
    hashes: Hashes  # their row hashes
    cumulative: npt.NDArray[np.uint64]  # cumulative[k] = sum of hashes[:k] modulo 2^64


class DatasetDigests:
    """Row hashes of a dataset and what the range-sync RPCs answer from them."""

    def __init__(self, dataset: EmbeddingDataset) -> None:
        self._dataset = dataset
        self._index: _Index | None = None
        self._lock = threading.Lock()

    def built(self) -> DatasetDigests:
        """This, with its hashes computed now rather than on the first request."""
        self._built()
        return self

    def _built(self) -> _Index:
        with self._lock:
            if self._index is None:
                self._index = self._build()
            return self._index

    def _build(self) -> _Index:
        data = self._dataset
        first = data.invalid_prefix
        keys = data.keys
        # The last copy of each id: the next key differs (keys are sorted, copies in file order).
        last = np.ones(len(keys), dtype=bool)
        if len(keys) > 1:
            last[:-1] = keys[:-1] != keys[1:]
        rows = first + np.flatnonzero(last)
        hashes = data.row_hashes[rows]
        cumulative = np.zeros(len(hashes) + 1, dtype=np.uint64)
        np.cumsum(hashes.view(np.uint64), dtype=np.uint64, out=cumulative[1:])
        return _Index(rows=rows, hashes=hashes, cumulative=cumulative)

    def _span(self, index: _Index, after: str, until: str) -> tuple[int, int]:
        """``[lo, hi)`` into the counted rows for the range ``(after, until]`` ('' = open)."""
        start = self._dataset.start_after(after)
        stop = self._dataset.stop_at(until)
        lo = int(np.searchsorted(index.rows, start, side="left"))
        hi = int(np.searchsorted(index.rows, stop, side="left"))
        return lo, max(lo, hi)

    def digest(self, after: str, until: str) -> RangeDigest:
        """Count and digest of the range; ``ValueError`` when a bound is not a UUID."""
        index = self._built()
        lo, hi = self._span(index, after, until)
        return RangeDigest.from_sum(hi - lo, int(index.cumulative[hi]) - int(index.cumulative[lo]))

    def listing(self, after: str, until: str) -> tuple[bytes, Hashes]:
        """The 16-byte keys (concatenated, ascending) and row hashes of the range's counted rows."""
        index = self._built()
        lo, hi = self._span(index, after, until)
        keys = self._dataset.keys[index.rows[lo:hi] - self._dataset.invalid_prefix]
        return keys.tobytes(), index.hashes[lo:hi]

    def positions(self, after: str, until: str, only_ids: bytes) -> npt.NDArray[np.intp]:
        """Dataset positions of every row (every copy) in the range whose key is in ``only_ids``, and,
        for a range from the first row, the rows whose id is not a UUID (they are in no listing)."""
        data = self._dataset
        start, stop = data.start_after(after), data.stop_at(until)
        if len(only_ids) % 16:
            raise ValueError(f"only_ids holds {len(only_ids)} bytes, not whole 16-byte keys")
        wanted = np.frombuffer(only_ids, dtype="S16")
        first = data.invalid_prefix
        lo, hi = max(start, first) - first, max(stop, first) - first
        keys = data.keys[lo:hi]
        hit = first + lo + np.flatnonzero(np.isin(keys, wanted))
        if start == 0 and first:
            # Rows whose id is not a UUID cannot be named: a stream from the first row has them.
            return np.concatenate([np.arange(first, dtype=np.intp), hit])
        return hit


def key_strings(keys: bytes) -> list[str]:
    """Canonical UUID strings of concatenated 16-byte keys."""
    return [str(uuid.UUID(bytes=keys[i : i + 16])) for i in range(0, len(keys), 16)]


def selected_chunks(dataset: EmbeddingDataset, positions: npt.NDArray[np.intp], size: int) -> Iterator[RowChunkBytes]:
    """Messages of about ``size`` of the rows at ``positions`` (ascending); copies of one id stay
    in one message, as :meth:`EmbeddingDataset.chunks` keeps them, defective rows are marked as
    there, and a message over :data:`MAX_CHUNK_BYTES` is cut again."""
    picked = positions.tolist()
    begin = 0
    while begin < len(picked):
        end = min(begin + size, len(picked))
        while end < len(picked) and dataset.ids[picked[end]] == dataset.ids[picked[end - 1]]:
            end += 1
        yield from _fitting(dataset, picked[begin:end])
        begin = end


def _fitting(dataset: EmbeddingDataset, rows: list[int]) -> Iterator[RowChunkBytes]:
    message = dataset.message_of(rows)
    if message.ByteSize() <= MAX_CHUNK_BYTES:
        yield message
        return
    middle = len(rows) // 2
    while 0 < middle < len(rows) and dataset.ids[rows[middle]] == dataset.ids[rows[middle - 1]]:
        middle += 1
    if middle <= 0 or middle >= len(rows):  # one row, or copies of one id: cells are bounded
        yield message
        return
    yield from _fitting(dataset, rows[:middle])
    yield from _fitting(dataset, rows[middle:])
