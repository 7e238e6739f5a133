"""The recall sample's narrowed reads (storage/recall.py): the bounds they are made of and when
they are used. What PostgreSQL returns under them is tested in tests/integration/storage/test_search.py."""

from __future__ import annotations

import numpy as np

from airflow_embedding_provider.storage.recall import _NARROW_MAX_QUERIES, _kth_distance, narrowing


def _keys(count: int) -> np.ndarray:
    return np.array([i.to_bytes(16, "big") for i in range(count)], dtype="V16")


def test_a_row_read_twice_counts_once_in_a_bound() -> None:
    # The sampled rows are also in the subset when its pages hold them: counted twice, a row would
    # make the 2nd-nearest distance that of the nearest, a bound below the true one.
    query = np.zeros((1, 4))
    stored = np.array([[1.0, 0, 0, 0], [2.0, 0, 0, 0], [3.0, 0, 0, 0]])
    keys = _keys(3)
    twice = np.concatenate([stored, stored[:1]])
    assert _kth_distance(query, np.concatenate([keys, keys[:1]]), twice, 2)[0] == 2.0
    assert _kth_distance(query, keys, stored, 3)[0] == 3.0
    assert np.isinf(_kth_distance(query, keys, stored, 4)[0])  # fewer rows than k: no bound


def test_a_bound_is_the_exact_kth_distance_among_many_rows() -> None:
    rng = np.random.default_rng(1)
    stored = rng.standard_normal((3000, 16)) * 100 + 1000  # the expanded form loses digits here
    queries = stored[:5] + rng.standard_normal((5, 16)) * 0.01
    exact = np.sort(np.sqrt(((stored[None, :, :] - queries[:, None, :]) ** 2).sum(axis=2)), axis=1)[:, 10]
    assert np.array_equal(_kth_distance(queries, _keys(3000), stored, 11), exact)


def test_a_read_is_narrowed_only_where_the_bounds_admit_a_small_part_of_the_subset() -> None:
    rng = np.random.default_rng(2)
    subset = rng.standard_normal((2000, 8))
    queries = subset[:10]
    tight = np.full(10, 0.5)
    assert narrowing(queries, tight, subset) is not None
    loose = np.full(10, 100.0)  # admits every row: the whole read is cheaper
    assert narrowing(queries, loose, subset) is None
    assert narrowing(queries, np.append(tight[:-1], np.inf), subset) is None  # a query without a bound
    assert narrowing(queries, tight, subset[:0]) is None  # no subset to estimate from
    many = rng.standard_normal((_NARROW_MAX_QUERIES + 1, 8))
    assert narrowing(many, np.full(len(many), 0.5), subset) is None
