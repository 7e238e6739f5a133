"""PostgreSQL ``COPY ... (FORMAT BINARY)`` buffers for a whole batch at once.

The embedding rows have a fixed size, so a structured numpy array lays out every tuple (field
count, uuid, pgvector's binary ``vector``: int16 dim, int16 unused, float4 big-endian values)
in one pass instead of encoding each row and float in Python. Metadata rows hold text of any
length; they are joined from pre-encoded parts, several times faster than psycopg's per-row
``Copy.write_row`` with its per-value type dispatch.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from airflow_embedding_provider.rows import FloatMatrix, RowBatch

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)
_NULL = struct.pack("!i", -1)
_METADATA_ROW_START = struct.pack("!hi", 5, 16)  # 5 fields; the first, the uuid, is 16 bytes
_HASHED_ROW_START = struct.pack("!hi", 6, 16)  # the same and row_hash, an int8, last
_INT4_LENGTH = struct.pack("!i", 4)
_INT8_LENGTH = struct.pack("!i", 8)


def uuid_bytes(ids: Sequence[str]) -> np.ndarray:
    """The 16-byte forms of canonical UUID strings as an ``(n, 16)`` uint8 array (one hex decode
    for the whole batch; a row's id is 36 characters, else the batch is refused)."""
    text = "".join(ids)
    if len(text) != 36 * len(ids):
        raise ValueError("ids must be canonical UUID strings (36 characters)")
    return np.frombuffer(bytes.fromhex(text.replace("-", "")), dtype=np.uint8).reshape(len(ids), 16)


def embedding_copy_buffer(ids: Sequence[str], vectors: FloatMatrix) -> bytes:
    """A complete binary COPY stream for a table ``(id uuid, vector vector(dim))``."""
    return embedding_copy_view(ids, vectors).tobytes()


def embedding_copy_view(ids: Sequence[str], vectors: FloatMatrix) -> memoryview:
    """:func:`embedding_copy_buffer` as a view of the one array it is laid out in: the header,
    the rows and the trailer are written in place, no copy of the stream is made to return it."""
    n, dim = vectors.shape
    if dim > 16000:
        raise ValueError(f"dimension {dim} is above pgvector's 16000")
    layout = np.dtype(
        [
            ("fields", ">i2"),
            ("id_len", ">i4"),
            ("id", "u1", (16,)),
            ("vec_len", ">i4"),
            ("dim", ">i2"),
            ("unused", ">i2"),
            ("vec", ">f4", (dim,)),
        ]
    )
    stream = np.empty(len(HEADER) + n * layout.itemsize + len(TRAILER), dtype=np.uint8)
    stream[: len(HEADER)] = np.frombuffer(HEADER, dtype=np.uint8)
    stream[len(stream) - len(TRAILER) :] = np.frombuffer(TRAILER, dtype=np.uint8)
    rows = stream[len(HEADER) : len(stream) - len(TRAILER)].view(layout)
    rows["fields"] = 2
    rows["id_len"] = 16
    rows["id"] = uuid_bytes(ids)
    rows["vec_len"] = 4 + 4 * dim
    rows["dim"] = dim
    rows["unused"] = 0
    rows["vec"] = vectors
    return stream.data  # a memoryview of its bytes


def metadata_copy_buffer(batch: RowBatch, row_hashes: np.ndarray | None = None) -> bytes:
    """A complete binary COPY stream for ``(id uuid, company_name text, exp_years int4,
    english_level text, primary_keyword text)``, and ``row_hash int8`` when ``row_hashes`` (one a
    row) are given; ``exp_years`` must fit int4 (validation checks)."""
    n = len(batch.ids)
    # The fixed-size parts of every row (its field count and uuid, then its hash) laid out by
    # numpy; a row's variable part, its three texts and its years, is joined from encodings made
    # once per distinct value (metadata repeats), and the parts interleaved by slice assignment.
    hashed = row_hashes is not None
    fields = [("len", "S4"), ("hash", ">i8")] if hashed else []
    fixed = np.empty(n, dtype=[*fields, ("start", "S6"), ("id", "u1", (16,))])
    if hashed:
        fixed["len"] = _INT8_LENGTH
        fixed["hash"] = row_hashes
    fixed["start"] = _HASHED_ROW_START if hashed else _METADATA_ROW_START
    fixed["id"] = uuid_bytes(batch.ids)
    raw, width = fixed.tobytes(), fixed.itemsize
    texts: dict[str | None, bytes] = {}
    years: dict[int | None, bytes] = {}
    text, year = texts.get, years.get
    # An encoding is never empty, so ``or`` falls through to encoding only a value not seen yet.
    middles = [
        (text(name) or _text_part(texts, name))
        + (year(exp) or _years_part(years, exp))
        + (text(level) or _text_part(texts, level))
        + (text(keyword) or _text_part(texts, keyword))
        for name, exp, level, keyword in zip(
            batch.company_name, batch.exp_years, batch.english_level, batch.primary_keyword, strict=True
        )
    ]
    if hashed:  # a row: field count and uuid, middle, hash (stored first in ``fixed``)
        parts = [b""] * (3 * n)
        parts[0::3] = [raw[at + 12 : at + width] for at in range(0, n * width, width)]
        parts[1::3] = middles
        parts[2::3] = [raw[at : at + 12] for at in range(0, n * width, width)]
    else:
        parts = [b""] * (2 * n)
        parts[0::2] = [raw[at : at + width] for at in range(0, n * width, width)]
        parts[1::2] = middles
    return HEADER + b"".join(parts) + TRAILER


def _text_part(seen: dict[str | None, bytes], value: str | None) -> bytes:
    """A text field as COPY BINARY has it (length, UTF-8 bytes; NULL as length -1), remembered in ``seen``."""
    if value is None:
        part = _NULL
    else:
        data = value.encode()
        part = len(data).to_bytes(4, "big") + data
    seen[value] = part
    return part


def _years_part(seen: dict[int | None, bytes], value: int | None) -> bytes:
    """An int4 field as COPY BINARY has it, remembered in ``seen``."""
    part = _NULL if value is None else _INT4_LENGTH + value.to_bytes(4, "big", signed=True)
    seen[value] = part
    return part
