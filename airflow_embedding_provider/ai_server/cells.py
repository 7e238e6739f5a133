"""Source cells as real recruiting data writes them, turned into what the wire carries.

Every function here handles one column a time and never raises for a cell: a value it cannot
serve becomes a :class:`CellDefect` on that row (the row is still served, marked, and the batch
side puts it in its DLQ with the reason and the original value). Only whole-file problems raise,
and that is ``dataset``'s business.

Coercion rules (the README's "Values as the file has them" paragraph says the same):

- Missing markers (``None``, ``NaN``, ``pd.NA``, ``NaT``; in ``Exp Years`` also an empty or blank
  string) are a missing value: the field is left unset (``NULL`` in the tables).
- ``Exp Years``: whole numbers (``3``, ``3.0``, ``Decimal("3")``, ``"3"``), ``"3y"``, ``"3 yrs"``,
  ``"3 years"``; ``"no_exp"``, ``"no experience"`` (and ``"0"``) are 0; a range ``"3-5"`` and an
  open value ``"5+"`` / ``"10+ years"`` are their lower bound, the least experience the post asks
  for. Anything else (``"ten"``, ``"1.5"``, ``1.5``, ``inf``, ``True``, a negative number, more than
  an ``INT`` holds) is a defect of the row.
- Text columns: strings as they are; whole numbers as their digits (pandas turns an integer column
  with a gap into floats). Other kinds (bool, bytes, lists, timestamps, fractional floats) are
  defects, and so are text that UTF-8 cannot encode (a lone surrogate) and text longer than the
  batch side stores (``MAX_TEXT_LENGTH``), which then travels without that cell.
- Vectors: lists, tuples or numpy arrays of any real dtype (float16/32/64, integers), cast to
  float32. Strings, dicts, ragged or nested lists, booleans and complex numbers are defects, and so
  is a vector too large for one gRPC message, which then travels without its vector.
"""

from __future__ import annotations

import base64
import decimal
import hashlib
import json
import math
import re
from typing import Any

import numpy as np
import pandas as pd

from airflow_embedding_provider.rows import CellDefect
from airflow_embedding_provider.validation import INT4_MAX, MAX_TEXT_LENGTH

#: A row's vector may take at most this many bytes (131,072 float32 values): whatever its other
#: cells hold, a row then fits a message well under gRPC's 4 MiB default.
MAX_VECTOR_BYTES = 512 * 1024
#: A defect's original value is kept whole up to this size as JSON, summarised beyond.
MAX_VALUE_JSON = 64 * 1024
_UNIT = r"(?:y|yr|yrs|year|years)?"
_WHOLE = re.compile(rf"^([+-]?\d{{1,12}})\s*{_UNIT}$")
_RANGE = re.compile(rf"^(\d{{1,12}})\s*{_UNIT}\s*(?:-|\u2013|\u2014|to)\s*(\d{{1,12}})\s*{_UNIT}$")
_OPEN = re.compile(rf"^(\d{{1,12}})\s*(?:\+\s*{_UNIT}|{_UNIT}\s*\+)$")
#: Spellings of "no experience required" (Djinni writes ``no_exp``).
NO_EXPERIENCE = frozenset({"no_exp", "no exp", "no-exp", "no experience", "no_experience", "none required"})


def is_missing(value: Any) -> bool:
    """``None``, ``NaN``, ``pd.NA`` or ``NaT``: a cell without a value."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and value != value


def cell_json(value: Any) -> Any:
    """The cell as a JSON-able value that JSONB can store: exact where JSON can say it, else
    ``{"type": ..., "repr": ...}``; anything larger than :data:`MAX_VALUE_JSON` is summarised
    (type, length, sha256 and a prefix)."""
    out = _json(value)
    text = json.dumps(out, ensure_ascii=False)
    if len(text) <= MAX_VALUE_JSON:
        return out
    raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else repr(value).encode()
    length = len(value) if hasattr(value, "__len__") else None
    return {
        "type": type(value).__name__,
        "length": length,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "prefix": _json(value[:200]) if isinstance(value, str) else repr(value)[:200],
        "summarised": True,
    }


def _json(value: Any) -> Any:
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else {"type": "float", "repr": str(float(value))}
    if isinstance(value, str):
        if "\x00" in value or not encodable(value):  # JSONB holds neither NUL nor a lone surrogate
            return {"type": "str", "repr": repr(value)}
        return value
    if isinstance(value, (bytes, bytearray)):
        return {"type": "bytes", "base64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (list, tuple)) and len(value) <= 4096:
        return [_json(v) for v in value]
    return {"type": type(value).__name__, "repr": repr(value)[:MAX_VALUE_JSON]}


def encodable(text: str) -> bool:
    """Whether UTF-8 (and so protobuf and PostgreSQL) can carry ``text``: not with a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clip(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


Defects = dict[int, list[CellDefect]]


def _mark(
    defects: Defects, row: int, column: str, kind: str, message: str, value: Any, *, json_ready: bool = False
) -> None:
    """Record a defect; ``value`` is the cell as in the file, or already JSON-able with ``json_ready``."""
    defects.setdefault(row, []).append(CellDefect(column, kind, message, value if json_ready else cell_json(value)))


def text_column(values: list[Any], column: str, defects: Defects) -> list[str | None]:
    """Text cells; a defect (and ``None``) for a cell that is not text or cannot travel."""
    # Fast path for the common column: every cell a short string or missing, all encodable.
    if all((type(v) is str and len(v) <= MAX_TEXT_LENGTH) or v is None for v in values):
        present = [v for v in values if v]
        if encodable("".join(present)):
            return list(values)
    out: list[str | None] = []
    for i, v in enumerate(values):
        if isinstance(v, str):
            if len(v) > MAX_TEXT_LENGTH:
                message = f"column {column!r} has {len(v)} characters, at most {MAX_TEXT_LENGTH} are stored"
                _mark(defects, i, column, "text_too_long", message, v)
                out.append(None)
            elif not encodable(v):
                message = f"column {column!r} holds text that UTF-8 cannot encode (a lone surrogate): {_clip(v)}"
                _mark(defects, i, column, "unencodable_text", message, v)
                out.append(None)
            else:
                out.append(v)
        elif is_missing(v):
            out.append(None)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
            out.append(str(v))  # a numeric keyword such as 1C stays text
        elif isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
            out.append(str(int(v)))  # an integer column that pandas made float by a gap
        else:
            message = f"column {column!r} holds {type(v).__name__} {_clip(v)}, expected text"
            _mark(defects, i, column, "not_text", message, v)
            out.append(None)
    return out


def _whole(value: Any) -> int | None:
    """The whole number ``value`` spells, or ``None``."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    if isinstance(value, decimal.Decimal):
        return int(value) if value.is_finite() and value == value.to_integral_value() else None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in NO_EXPERIENCE:
            return 0
        for pattern in (_WHOLE, _OPEN, _RANGE):
            if m := pattern.match(text):
                if pattern is _RANGE and int(m.group(1)) > int(m.group(2)):
                    return None
                return int(m.group(1))  # a range or an open value: its lower bound
    return None


def years_column(values: list[Any], column: str, defects: Defects) -> list[int | None]:
    """Years of experience as whole numbers ``0..INT4_MAX``; a defect (and ``None``) otherwise."""
    out: list[int | None] = []
    for i, v in enumerate(values):
        if is_missing(v) or (isinstance(v, str) and not v.strip()):
            out.append(None)
            continue
        years = _whole(v)
        if years is None:
            message = (
                f"column {column!r} holds {type(v).__name__} {_clip(v)}, expected a whole number of years "
                "(3, '3y', '3 years', 'no_exp', '3-5', '5+')"
            )
            _mark(defects, i, column, "invalid_exp_years", message, v)
        elif not 0 <= years <= INT4_MAX:
            message = f"column {column!r} holds {_clip(v)}, expected 0 to {INT4_MAX} years"
            _mark(defects, i, column, "exp_years_out_of_range", message, v)
            years = None
        out.append(years)
    return out


def _as_vector(value: Any) -> tuple[np.ndarray | None, str | None]:
    """A float32 vector from one cell, or ``(None, reason)``."""
    if isinstance(value, (str, bytes, dict, set)):
        return None, f"a {type(value).__name__}"
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        return None, "a ragged or mixed nested list"
    if array.dtype.kind not in "fiu":
        what = {"b": "booleans", "c": "complex numbers", "U": "strings", "S": "bytes"}.get(array.dtype.kind)
        return None, f"{what or 'values that are not all numbers'}"
    if array.ndim != 1:
        return None, f"an array of shape {array.shape}, not a flat list"
    if array.size * 4 > MAX_VECTOR_BYTES:
        return None, f"{array.size} values, more than one message carries ({MAX_VECTOR_BYTES // 4} at most)"
    with np.errstate(over="ignore", invalid="ignore"):
        return array.astype(np.float32), None


def vector_column(values: list[Any], column: str, defects: Defects) -> list[np.ndarray]:
    """One float32 array a row (empty where the vector is missing or defective)."""
    empty = np.empty(0, dtype=np.float32)
    out: list[np.ndarray] = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and is_missing(v)):
            out.append(empty)
            continue
        array, reason = _as_vector(v)
        if array is None:
            kind = "vector_too_large" if "message carries" in str(reason) else "invalid_vector"
            message = f"column {column!r} holds {reason}, expected a list of numbers"
            _mark(defects, i, column, kind, message, _vector_value(v), json_ready=True)
            out.append(empty)
        else:
            out.append(array)
    return out


def _vector_value(value: Any) -> Any:
    """A defective vector cell for the DLQ as JSON: whole when small, else type, length and a prefix."""
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) > 4096:
        head = value[:16].tolist() if isinstance(value, np.ndarray) else list(value[:16])
        return {
            "type": type(value).__name__,
            "length": len(value),
            "prefix": [_json(v) for v in head],
            "summarised": True,
        }
    if isinstance(value, np.ndarray) and value.ndim == 1:
        return [_json(v) for v in value.tolist()]
    return cell_json(value)
