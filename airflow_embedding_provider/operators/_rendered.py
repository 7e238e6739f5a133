"""Values of templated operator fields, as Jinja renders them (text), read strictly."""

from __future__ import annotations

from typing import Any

from airflow_embedding_provider.rows import canonical_uuid


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
