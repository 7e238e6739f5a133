"""PostgreSQL ``COPY ... (FORMAT BINARY)`` buffers built with numpy, a whole batch at once.

The embedding rows have a fixed size, so a structured numpy array lays out every tuple (field
count, uuid, pgvector's binary ``vector``: int16 dim, int16 unused, float4 big-endian values)
in one pass instead of encoding each row and float in Python.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np

from airflow_embedding_provider.rows import FloatMatrix

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
TRAILER = struct.pack("!h", -1)


def uuid_bytes(ids: Sequence[str]) -> np.ndarray:
    """The 16-byte forms of canonical UUID strings as an ``(n, 16)`` uint8 array (one hex decode
    for the whole batch; a row's id is 36 characters, else the batch is refused)."""
    text = "".join(ids)
    if len(text) != 36 * len(ids):
        raise ValueError("ids must be canonical UUID strings (36 characters)")
    return np.frombuffer(bytes.fromhex(text.replace("-", "")), dtype=np.uint8).reshape(len(ids), 16)


def embedding_copy_buffer(ids: Sequence[str], vectors: FloatMatrix) -> bytes:
    """A complete binary COPY stream for a table ``(id uuid, vector vector(dim))``."""
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
    rows = np.empty(n, dtype=layout)
    rows["fields"] = 2
    rows["id_len"] = 16
    rows["id"] = uuid_bytes(ids)
    rows["vec_len"] = 4 + 4 * dim
    rows["dim"] = dim
    rows["unused"] = 0
    rows["vec"] = vectors
    return HEADER + rows.tobytes() + TRAILER
