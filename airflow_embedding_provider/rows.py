"""The row batch every layer hands on: columnar, with the vectors as one float32 matrix.

A batch is immutable by convention once built (docs/design.md §10.5: "immutable chunk data"): the stages
after the wire read it and build new batches rather than edit one in place.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

#: Column names of the ``.pkl`` DataFrame, as the design gives them (docs/design.md §4.1).
PKL_COLUMNS = ("id", "Company Name", "Exp Years", "English Level", "Primary Keyword", "job_post_vectors")
METADATA_FIELDS = ("company_name", "exp_years", "english_level", "primary_keyword")
DEFAULT_DIMENSION = 384
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
    """

    ids: Sequence[str]
    company_name: Sequence[str | None]
    exp_years: Sequence[int | None]
    english_level: Sequence[str | None]
    primary_keyword: Sequence[str | None]
    vectors: FloatMatrix

    def __post_init__(self) -> None:
        n = len(self.ids)
        lengths = {
            len(self.company_name),
            len(self.exp_years),
            len(self.english_level),
            len(self.primary_keyword),
            self.vectors.shape[0],
        }
        if lengths != {n}:
            raise ValueError(f"columns of a RowBatch differ in length: ids={n}, others={sorted(lengths)}")
        if self.vectors.ndim != 2 or self.vectors.dtype != np.float32:
            raise ValueError(f"vectors must be a 2-d float32 matrix, got {self.vectors.dtype} {self.vectors.shape}")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, dimension: int) -> RowBatch:
        return cls(
            ids=[],
            company_name=[],
            exp_years=[],
            english_level=[],
            primary_keyword=[],
            vectors=np.empty((0, dimension), dtype=np.float32),
        )

    @property
    def dimension(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def last_id(self) -> str | None:
        return self.ids[-1] if self.ids else None

    def take(self, index: Sequence[int] | npt.NDArray[np.intp]) -> RowBatch:
        """A new batch with the rows at ``index``, in that order."""
        idx = [int(i) for i in index]
        return RowBatch(
            ids=[self.ids[i] for i in idx],
            company_name=[self.company_name[i] for i in idx],
            exp_years=[self.exp_years[i] for i in idx],
            english_level=[self.english_level[i] for i in idx],
            primary_keyword=[self.primary_keyword[i] for i in idx],
            vectors=self.vectors[np.asarray(idx, dtype=np.intp)],
        )

    def slice(self, start: int, stop: int) -> RowBatch:
        return RowBatch(
            ids=self.ids[start:stop],
            company_name=self.company_name[start:stop],
            exp_years=self.exp_years[start:stop],
            english_level=self.english_level[start:stop],
            primary_keyword=self.primary_keyword[start:stop],
            vectors=self.vectors[start:stop],
        )

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


def canonical_uuid(value: str) -> str:
    """The canonical lowercase form of a UUID string; ``ValueError`` with the value otherwise."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"not a UUID: {value!r}") from None
