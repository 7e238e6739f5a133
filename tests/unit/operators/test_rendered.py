"""``operators/_rendered.py``: templated values as Jinja renders them, read strictly."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from airflow_embedding_provider.operators._rendered import flag, instant, strings, uuid_or_none

UID = "019b0ab5-42f1-7c87-b879-9d838b83d2e5"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, []), ("", []), ("None", []), ("[]", []), ('["a", null, " "]', ["a"]), (" a, b ,,c", ["a", "b", "c"])],
)
def test_strings_from_lists_json_and_commas(value: str | None, expected: list[str]) -> None:
    assert strings(value) == expected
    assert strings(["x", "y"]) == ["x", "y"]


def test_instant_is_aware_and_utc_without_a_zone() -> None:
    assert instant(None, "since") is None and instant(" null ", "since") is None
    assert instant("2025-12-11T10:00:00", "since") == datetime(2025, 12, 11, 10, tzinfo=timezone.utc)
    assert instant("2025-12-12T00:00:00+02:00", "until").utcoffset() == timedelta(hours=2)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="since must be an ISO 8601 date-time, got 'last week'"):
        instant("last week", "since")


def test_flag_and_uuid_read_strictly() -> None:
    assert flag("Yes", "refetch") is True and flag("off", "refetch") is False and flag(True, "x") is True
    with pytest.raises(ValueError, match="refetch must be true or false"):
        flag("maybe", "refetch")
    assert uuid_or_none("None") is None and uuid_or_none(UID.upper()) == UID
    with pytest.raises(ValueError, match="not a UUID"):
        uuid_or_none("yesterday")
