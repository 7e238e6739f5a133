"""Per-row validation of received rows: what passes becomes a :class:`RowBatch`, the rest a
:class:`Rejected` row for the dead letter queue with a reason a person can act on.

The sender's row hashes (``RowChunk.row_hashes``) reach a batch only after a check: the first and
the last row of the chunk are hashed here and must match. A chunk whose hashes disagree, or that
any check sent through the per-row path, carries none, and the writer hashes its rows itself; so
a stored ``row_hash`` is always one the batch side computed or saw confirmed on the same chunk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from airflow_embedding_provider.digest import Hashes, row_hash
from airflow_embedding_provider.rows import INT4_MAX as INT4_MAX
from airflow_embedding_provider.rows import RowBatch
from airflow_embedding_provider.rows import canonical_uuid_or_none as _canonical
from airflow_embedding_provider.wire.codec import FLOAT32_LE, WireChunk

log = logging.getLogger(__name__)

#: PostgreSQL ``text`` cannot hold NUL; longer values than this are treated as garbage input.
MAX_TEXT_LENGTH = 10_000
TEXT_FIELDS = ("company_name", "english_level", "primary_keyword")


@dataclass(frozen=True)
class Rejected:
    """A row that must not be written, with the reason and the whole row as received.

    :param id: the canonical UUID when the id was valid, else ``None``.
    :param kind: a short machine-readable reason (``dimension_mismatch``, ``invalid_id``, ...).
    :param message: what is wrong, which field, expected versus found.
    :param payload: the row as received, vector included, JSON-able.
    """

    id: str | None
    kind: str
    message: str
    payload: dict[str, Any] = field(repr=False)
    #: The row's hash as received (digest.py), or ``None`` when not computed where it was rejected.
    row_hash: int | None = field(default=None, repr=False)

    @property
    def row_key(self) -> str:
        """sha256 of the row as received: the same bad row sent twice is one DLQ entry."""
        canonical = json.dumps(self.payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


def json_vector(values: np.ndarray) -> list[float | str]:
    """A float32 vector as JSON values that JSONB keeps exactly.

    JSON has no NaN/Infinity and JSONB's numeric has no -0.0: those are spelled as strings so the
    payload stays lossless (the replay reads them back with ``float()``).
    """
    out: list[float | str] = []
    for v in values.astype(float).tolist():
        out.append(v if np.isfinite(v) and (v or not np.signbit(v)) else str(v))
    return out


def json_text(value: str | None) -> str | dict[str, str] | None:
    """Text as JSONB can hold it: JSONB refuses NUL (``\\u0000``), so such text goes as
    ``{"base64": <UTF-8 bytes>}`` and the DLQ row is written whatever the text holds."""
    if value is None or "\x00" not in value:
        return value
    return {"base64": base64.b64encode(value.encode("utf-8")).decode()}


def _payload(chunk: WireChunk, i: int) -> dict[str, Any]:
    payload = _fields(chunk, i)
    if i in chunk.defects:
        # The cells the sender could not serve, as they were in its file: the rest of the row is above.
        payload["defects"] = [
            {"column": d.column, "error_kind": d.kind, "message": d.message, "value": d.value} for d in chunk.defects[i]
        ]
    return payload


def _fields(chunk: WireChunk, i: int) -> dict[str, Any]:
    raw = chunk.vectors[i]
    vector: Any
    if len(raw) % 4 == 0:
        vector = json_vector(np.frombuffer(raw, dtype=FLOAT32_LE))
    else:
        vector = {"base64": base64.b64encode(raw).decode()}
    return {
        "id": json_text(chunk.ids[i]),
        "company_name": json_text(chunk.company_name[i]),
        "exp_years": chunk.exp_years[i],
        "english_level": json_text(chunk.english_level[i]),
        "primary_keyword": json_text(chunk.primary_keyword[i]),
        "vector": vector,
    }


def _received_hash(chunk: WireChunk, i: int, canonical: str | None) -> int:
    """The row's hash (digest.py) from the bytes received, its id in canonical form when valid:
    the AI server hashes the same values, so a pending DLQ entry matches the source's row."""
    return row_hash(
        canonical or chunk.ids[i],
        chunk.company_name[i],
        chunk.exp_years[i],
        chunk.english_level[i],
        chunk.primary_keyword[i],
        chunk.vectors[i],
    )


#: The characters of a canonical UUID (lowercase hex digits and its four hyphens).
_UUID_CHARACTERS = b"-0123456789abcdef"


def _all_canonical(ids: Sequence[str]) -> bool:
    """Whether every id matches :data:`~airflow_embedding_provider.rows.CANONICAL_UUID`, with a few C-level operations on the
    joined ids instead of one match an id: each id 36 characters (so two wrong lengths cannot
    pair up), a hyphen at the four places of every id and nowhere else, the rest hex digits."""
    if not ids:
        return True
    if set(map(len, ids)) != {36}:
        return False
    text = "".join(ids)
    if not text.isascii():
        return False
    raw = text.encode("ascii")
    hyphens = b"-" * len(ids)
    return (
        raw[8::36] == hyphens
        and raw[13::36] == hyphens
        and raw[18::36] == hyphens
        and raw[23::36] == hyphens
        and raw.count(b"-") == 4 * len(ids)
        and not raw.translate(None, _UUID_CHARACTERS)
    )


def _check_row(chunk: WireChunk, i: int, canonical: str | None, dimension: int) -> tuple[str, str] | None:
    marked = chunk.defects.get(i)
    if marked:  # the sender's verdict on a cell it could not serve comes first: it names the column
        return marked[0].kind, "; ".join(d.message for d in marked)
    raw_id = chunk.ids[i]
    if not raw_id:
        return "missing_id", "id is missing"
    if canonical is None:
        return "invalid_id", f"id {raw_id[:80]!r} is not a UUID"
    for name in TEXT_FIELDS:
        value = getattr(chunk, name)[i]
        if value is None:
            continue
        if "\x00" in value:
            return "nul_byte", f"{name} contains a NUL byte, which PostgreSQL text cannot store"
        if len(value) > MAX_TEXT_LENGTH:
            return "text_too_long", f"{name} has {len(value)} characters, at most {MAX_TEXT_LENGTH} allowed"
    years = chunk.exp_years[i]
    if years is not None and not 0 <= years <= INT4_MAX:
        return "exp_years_out_of_range", f"exp_years is {years}, expected 0 to {INT4_MAX}"
    raw = chunk.vectors[i]
    if not raw:
        return "missing_vector", "vector is missing or empty"
    if len(raw) % 4:
        return "bad_vector_bytes", f"vector has {len(raw)} bytes, not a whole number of float32 values"
    if len(raw) != 4 * dimension:
        return "dimension_mismatch", f"vector has {len(raw) // 4} dimensions, expected {dimension}"
    return None


def _all_rows_clean(chunk: WireChunk, dimension: int) -> bool:
    """Whether no row can fail :func:`_check_row`, decided a column at a time, without a Python
    loop over rows; ``False`` sends the chunk through the per-row checks, which say what is wrong."""
    if not _all_canonical(chunk.ids):
        return False
    for name in TEXT_FIELDS:
        values = list(filter(None, getattr(chunk, name)))
        if "\x00" in "".join(values) or max(map(len, values), default=0) > MAX_TEXT_LENGTH:
            return False
    years = [y for y in chunk.exp_years if y is not None]
    if years and not (min(years) >= 0 and max(years) <= INT4_MAX):
        return False
    return set(map(len, chunk.vectors)) <= {4 * dimension}


def validate_chunk(chunk: WireChunk, dimension: int) -> tuple[RowBatch, list[Rejected]]:
    """Split a received chunk into rows fit to store and rejected rows, keeping stream order."""
    if not chunk.defects and _all_rows_clean(chunk, dimension):
        return _finite_rows(chunk, list(range(len(chunk))), chunk.ids, [], dimension)
    good: list[int] = []
    rejected: list[Rejected] = []
    ids = [_canonical(raw) for raw in chunk.ids]
    for i in range(len(chunk)):
        problem = _check_row(chunk, i, ids[i], dimension)
        if problem is None:
            good.append(i)
        else:
            rejected.append(
                Rejected(ids[i], problem[0], problem[1], _payload(chunk, i), _received_hash(chunk, i, ids[i]))
            )
    return _finite_rows(chunk, good, ids, rejected, dimension)


def _finite_rows(
    chunk: WireChunk, good: list[int], ids: Sequence[str | None], rejected: list[Rejected], dimension: int
) -> tuple[RowBatch, list[Rejected]]:
    """The batch of rows ``good`` (which passed the per-row checks) whose vectors are all finite;
    the others join ``rejected``. ``ids`` are the canonical ids of every row of ``chunk``."""
    everything = len(good) == len(chunk)
    joined = b"".join(chunk.vectors if everything else [chunk.vectors[i] for i in good])
    # float32 is little-endian here: astype(copy=False) only copies on a big-endian machine.
    vectors = np.frombuffer(joined, dtype=FLOAT32_LE).reshape(len(good), dimension).astype(np.float32, copy=False)
    # One reduction over the whole matrix; the per-row answer only when some value is not finite.
    if not np.isfinite(vectors).all():
        finite = np.isfinite(vectors).all(axis=1)
        for pos in np.flatnonzero(~finite):
            i = good[pos]
            bad = np.flatnonzero(~np.isfinite(vectors[pos]))
            rejected.append(
                Rejected(
                    ids[i],
                    "non_finite_vector",
                    f"vector has non-finite values (NaN or infinity) at positions "
                    f"{bad[:5].tolist()}{'...' if bad.size > 5 else ''}",
                    _payload(chunk, i),
                    _received_hash(chunk, i, ids[i]),
                )
            )
        good = [good[pos] for pos in np.flatnonzero(finite)]
        vectors = vectors[finite]
        everything = False
    if everything:  # the common case: the columns as received, no per-row gathering
        batch = RowBatch(
            ids=ids,  # type: ignore[arg-type]  # every row passed, so every id is canonical
            company_name=chunk.company_name,
            exp_years=chunk.exp_years,
            english_level=chunk.english_level,
            primary_keyword=chunk.primary_keyword,
            vectors=vectors,
            hashes=_confirmed_hashes(chunk, ids),
        )
        return batch, rejected
    batch = RowBatch(
        ids=[ids[i] for i in good],  # type: ignore[misc]  # every good row has a canonical id
        company_name=[chunk.company_name[i] for i in good],
        exp_years=[chunk.exp_years[i] for i in good],
        english_level=[chunk.english_level[i] for i in good],
        primary_keyword=[chunk.primary_keyword[i] for i in good],
        vectors=np.ascontiguousarray(vectors),
    )
    return batch, rejected


_disagreement_logged = False


def _confirmed_hashes(chunk: WireChunk, ids: Sequence[str | None]) -> Hashes | None:
    """The sender's row hashes of a chunk whose rows all pass, when its first and last row, with
    their ids as stored (``ids``, canonical), hash to them here (module docstring); else ``None``."""
    claimed = chunk.row_hashes
    if claimed is None or not len(chunk):
        return None
    for i in {0, len(chunk) - 1}:
        if _received_hash(chunk, i, ids[i]) != int(claimed[i]):
            global _disagreement_logged
            if not _disagreement_logged:  # once a process: a server that disagrees does so on every chunk
                _disagreement_logged = True
                log.warning(
                    "the sender's row hash of id %s disagrees with the row it sent: this side hashes its rows "
                    "itself; range sync with that sender will stream every range until the two agree",
                    chunk.ids[i][:80],
                )
            return None
    return claimed
