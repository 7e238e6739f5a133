"""Row hashes and range digests: one definition for the AI server and the storage layer.

A row's hash is the first 8 bytes of SHA-256 (hardware-accelerated on common CPUs) over a
canonical encoding of the row as it crosses the wire: the id's text, the metadata fields
(``company_name``, ``exp_years``, ``english_level``, ``primary_keyword``, in that order, each
marked absent or present with its length), and the vector's raw little-endian float32 bytes. The
AI server hashes the rows of its file, the batch side hashes every row it stores (``row_hash``
column) and every row it dead-letters, so both sides compute the same value for the same row
without talking.

A range's digest is the number of rows and the sum of their hashes modulo 2^64: it does not depend
on the order of the rows (UUID4 ids come in any order), and PostgreSQL computes it with ``sum`` over
a ``bigint`` column. Equal digests mean, up to a 2^-64 chance, equal rows (docs/design.md §2: idempotent
writes; this is what lets a run skip what is already stored).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: The hash's definition; the wire carries it so that two sides on different versions refuse to compare.
HASH_VERSION = "sha256-64/recruit-row-v1"
#: Bytes of a row hash: the first 8 of the SHA-256 digest, one little-endian int64 on the wire.
HASH_BYTES = 8
_MOD = 2**64
_ABSENT = b"\x00"
_PRESENT = b"\x01"

Hashes = npt.NDArray[np.int64]


def _text(value: str | None) -> bytes:
    if value is None:
        return _ABSENT
    data = value.encode("utf-8", "surrogatepass")
    return _PRESENT + len(data).to_bytes(4, "little") + data


def _years(value: int | None) -> bytes:
    return _ABSENT if value is None else _PRESENT + int(value).to_bytes(8, "little", signed=True)


def row_hash(
    row_id: str,
    company_name: str | None,
    exp_years: int | None,
    english_level: str | None,
    primary_keyword: str | None,
    vector: bytes | memoryview,
) -> int:
    """The row's hash as a signed 64-bit integer (a PostgreSQL ``bigint``).

    :param row_id: the id as sent (the canonical lowercase UUID for a valid id).
    :param vector: the vector's little-endian float32 bytes, exactly as sent.
    """
    h = hashlib.sha256(
        b"".join(
            (
                _text(row_id),
                _text(company_name),
                _years(exp_years),
                _text(english_level),
                _text(primary_keyword),
                len(vector).to_bytes(4, "little"),
            )
        )
    )
    h.update(vector)
    return int.from_bytes(h.digest()[:HASH_BYTES], "little", signed=True)


def row_hashes(
    ids: Sequence[str],
    company_name: Sequence[str | None],
    exp_years: Sequence[int | None],
    english_level: Sequence[str | None],
    primary_keyword: Sequence[str | None],
    vectors: npt.NDArray[np.float32],
) -> Hashes:
    """:func:`row_hash` of every row of columns whose vectors are one float32 matrix.

    The same values, about 2 us a row instead of 3: metadata repeats (levels, keywords, companies),
    so each distinct value is encoded once.
    """
    matrix = np.ascontiguousarray(vectors, dtype="<f4")
    view = matrix.data.cast("B")
    width = 4 * (matrix.shape[1] if matrix.ndim == 2 else 0)
    length = width.to_bytes(4, "little")
    texts: dict[str | None, bytes] = {}
    years: dict[int | None, bytes] = {}

    def text(value: str | None) -> bytes:
        encoded = texts.get(value)
        if encoded is None:
            encoded = texts[value] = _text(value)
        return encoded

    def year(value: int | None) -> bytes:
        encoded = years.get(value)
        if encoded is None:
            encoded = years[value] = _years(value)
        return encoded

    out = np.empty(len(ids), dtype=np.int64)
    sha256, from_bytes = hashlib.sha256, int.from_bytes
    rows = zip(ids, company_name, exp_years, english_level, primary_keyword, strict=True)
    for i, (row_id, company, exp, english, keyword) in enumerate(rows):
        h = sha256(b"".join((_text(row_id), text(company), year(exp), text(english), text(keyword), length)))
        h.update(view[i * width : (i + 1) * width])
        out[i] = from_bytes(h.digest()[:HASH_BYTES], "little", signed=True)
    return out


@dataclass(frozen=True)
class RangeDigest:
    """How many rows a range holds and the sum of their hashes modulo 2^64 (unsigned)."""

    rows: int
    digest: int

    @classmethod
    def of(cls, hashes: Hashes) -> RangeDigest:
        return cls(len(hashes), int(hashes.view(np.uint64).sum(dtype=np.uint64)) if len(hashes) else 0)

    @classmethod
    def from_sum(cls, rows: int, total: int) -> RangeDigest:
        """From a count and a plain (unbounded) sum of signed hashes, as SQL's ``sum`` gives it."""
        return cls(int(rows), int(total) % _MOD)


def pack_hashes(hashes: Hashes) -> bytes:
    """Hashes as the wire carries them: one little-endian int64 a row."""
    return np.ascontiguousarray(hashes, dtype="<i8").tobytes()


def unpack_hashes(data: bytes) -> Hashes:
    return np.frombuffer(data, dtype="<i8").astype(np.int64)
