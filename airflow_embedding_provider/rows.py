"""The row batch every layer hands on: columnar, with the vectors as one float32 matrix.

A batch is immutable by convention once built (docs/design.md §10.5: "immutable chunk data"): the stages
after the wire read it and build new batches rather than edit one in place.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: Column names of the ``.pkl`` DataFrame, as the design gives them (docs/design.md §4.1).
PKL_COLUMNS = ("id", "Company Name", "Exp Years", "English Level", "Primary Keyword", "job_post_vectors")
METADATA_FIELDS = ("company_name", "exp_years", "english_level", "primary_keyword")
DEFAULT_DIMENSION = 384
#: The six columns of a row, as :class:`RowBatch` (and the wire's ``WireChunk``) name them.
ROW_COLUMNS = ("ids", "company_name", "exp_years", "english_level", "primary_keyword", "vectors")
#: ``exp_years`` is ``int32`` on the wire and ``INT`` (int4) in PostgreSQL: this bound holds for both.
INT4_MAX = 2**31 - 1
#: The canonical text of a UUID (lowercase, hyphenated): the form the AI server sends and ids are
#: stored in. Checked by this expression, far cheaper than ``uuid.UUID()``.
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: The values of ``english_level``, lowest first: a search filter ``english_level>=upper`` means
#: this level or any after it (storage/search.py).
ENGLISH_LEVELS = ("no_english", "basic", "pre", "intermediate", "upper", "fluent")

FloatMatrix = npt.NDArray[np.float32]


@dataclass(frozen=True)
class CellDefect:
    """One cell of a source row that cannot be served as the file has it (``RowDefect`` on the wire).

    :param column: the source column, e.g. ``Exp Years``.
    :param kind: a short machine-readable reason, the DLQ's ``error_kind``.
    :param message: what is wrong, naming the column.
    :param value: the cell as it was in the file, as a JSON-able value (large values summarised).
    """

    column: str
    kind: str
    message: str
    value: Any = None


@dataclass(frozen=True)
class RowBatch:
    """Rows in column form. ``vectors`` has one row per id and ``dimension`` columns.

    :param ids: canonical lowercase UUID strings.
    :param company_name: ``None`` where the source had no value; likewise the other metadata.
    :param vectors: float32 matrix of shape ``(len(ids), dimension)``.
    :param hashes: each row's hash (digest.py) when known already, one ``int64`` a row: the
        source's, checked by validation; ``None`` and the writer hashes the rows itself.
    """

    ids: Sequence[str]
    company_name: Sequence[str | None]
    exp_years: Sequence[int | None]
    english_level: Sequence[str | None]
    primary_keyword: Sequence[str | None]
    vectors: FloatMatrix
    hashes: npt.NDArray[np.int64] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.ids)
        lengths = {
            len(self.company_name),
            len(self.exp_years),
            len(self.english_level),
            len(self.primary_keyword),
            self.vectors.shape[0],
        }
        if self.hashes is not None:
            lengths.add(len(self.hashes))
        if lengths != {n}:
            raise ValueError(f"columns of a RowBatch differ in length: ids={n}, others={sorted(lengths)}")
        if self.vectors.ndim != 2 or self.vectors.dtype != np.float32:
            raise ValueError(f"vectors must be a 2-d float32 matrix, got {self.vectors.dtype} {self.vectors.shape}")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, dimension: int) -> RowBatch:
        return cls([], [], [], [], [], np.empty((0, dimension), dtype=np.float32))

    @classmethod
    def concat(cls, batches: Sequence[RowBatch], dimension: int) -> RowBatch:
        """One batch with the rows of ``batches``, in order; empty of ``dimension`` when there are none."""
        if not batches:
            return cls.empty(dimension)
        columns = {name: [v for b in batches for v in getattr(b, name)] for name in ROW_COLUMNS[:-1]}
        known = all(b.hashes is not None for b in batches)
        hashes = np.concatenate([b.hashes for b in batches if b.hashes is not None]) if known else None
        return cls(**columns, vectors=np.vstack([b.vectors for b in batches]), hashes=hashes)

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def last_id(self) -> str | None:
        return self.ids[-1] if self.ids else None

    def take(self, index: Sequence[int] | npt.NDArray[np.intp]) -> RowBatch:
        """A new batch with the rows at ``index``, in that order."""
        idx = [int(i) for i in index]
        columns = {name: [getattr(self, name)[i] for i in idx] for name in ROW_COLUMNS[:-1]}
        at = np.asarray(idx, dtype=np.intp)
        return RowBatch(**columns, vectors=self.vectors[at], hashes=None if self.hashes is None else self.hashes[at])

    def slice(self, start: int, stop: int) -> RowBatch:
        """A new batch with the rows ``start:stop``."""
        columns = {name: getattr(self, name)[start:stop] for name in ROW_COLUMNS}
        return RowBatch(**columns, hashes=None if self.hashes is None else self.hashes[start:stop])

    def row(self, i: int) -> dict[str, Any]:
        """One row as plain JSON-able values (for the DLQ payload and for tests)."""
        return {
            "id": self.ids[i],
            "company_name": self.company_name[i],
            "exp_years": self.exp_years[i],
            "english_level": self.english_level[i],
            "primary_keyword": self.primary_keyword[i],
            "vector": self.vectors[i].tolist(),
        }


def canonical_uuid_or_none(raw_id: str) -> str | None:
    """The canonical form of a UUID id, or ``None`` when it is not one."""
    if CANONICAL_UUID.fullmatch(raw_id):
        return raw_id
    try:
        return str(uuid.UUID(raw_id))
    except ValueError:
        return None


def canonical_uuid(value: str) -> str:
    """The canonical lowercase form of a UUID string; ``ValueError`` with the value otherwise."""
    canonical = canonical_uuid_or_none(value) if isinstance(value, str) else None
    if canonical is None:
        raise ValueError(f"not a UUID: {value!r}")
    return canonical
