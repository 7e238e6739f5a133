"""Search filters are parsed into values; anything else is refused with a line that says what to fix."""

from __future__ import annotations

import pytest

from airflow_embedding_provider.storage.search import SearchError, SearchFilter


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("primary_keyword=Python", SearchFilter("primary_keyword", "=", "Python")),
        ("primary_keyword = Data Science", SearchFilter("primary_keyword", "=", "Data Science")),
        ("english_level>=upper", SearchFilter("english_level", ">=", "upper")),
        ("exp_years<=3", SearchFilter("exp_years", "<=", 3)),
        ("exp_years=0", SearchFilter("exp_years", "=", 0)),
    ],
)
def test_filters_parse(text: str, expected: SearchFilter) -> None:
    assert SearchFilter.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("salary<=3", "unknown column 'salary'"),
        ("exp_years>=3", "exp_years takes <= or =, not '>='"),
        ("primary_keyword<=Python", "primary_keyword takes =, not '<='"),
        ("english_level>=native", "english_level is one of no_english, basic"),
        ("exp_years<=three", "exp_years takes a whole number"),
        ("exp_years<=", "no value after '<='"),
        ("Python", "write COLUMN OP VALUE"),
    ],
)
def test_bad_filters_are_refused_with_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(SearchError, match=message.replace("(", r"\(")):
        SearchFilter.parse(text)


def test_a_level_filter_means_that_level_or_higher() -> None:
    condition = SearchFilter.parse("english_level>=upper").condition()
    assert "'upper'" in repr(condition) and "'fluent'" in repr(condition) and "'pre'" not in repr(condition)
