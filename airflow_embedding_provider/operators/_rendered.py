"""Values of templated operator fields, as Jinja renders them (text), read strictly."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from airflow_embedding_provider.rows import canonical_uuid

T = TypeVar("T")


def value_or_none(value: T) -> T | None:
    """A templated field's value, or ``None`` when it was left empty: ``None``, or what Jinja
    renders for it, ``''`` (an empty Param) or ``'None'``."""
    return None if value in (None, "", "None") else value


def flag(value: Any, name: str) -> bool:
    """``true``/``false`` as a bool or its rendered text; a typo is an error, not ``False``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "", "none"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def uuid_or_none(value: Any) -> str | None:
    """A rendered UUID, canonical; '', 'None' and 'null' (a rendered missing value) mean none."""
    text = "" if value is None else str(value).strip()
    return None if text.lower() in ("", "none", "null") else canonical_uuid(text)


def strings(value: Sequence[str] | str | None) -> list[str]:
    """A list from a list, a JSON array (a rendered ``{{ params.x | tojson }}``) or ``a,b,c``."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "null"):
            return []
        if text.startswith("["):
            parsed = json.loads(text)
            return [str(v) for v in parsed if v is not None and str(v).strip()]
        return [part.strip() for part in text.split(",") if part.strip()]
    return [str(v) for v in value]


def instant(value: datetime | str | None, name: str) -> datetime | None:
    """An aware datetime; a value without a zone is taken as UTC, as Airflow does."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "null"):
            return None
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{name} must be an ISO 8601 date-time, got {text!r}") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
