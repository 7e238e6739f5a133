from __future__ import annotations

from collections.abc import Generator

from airflow_embedding_provider.pipeline import _Frontier, prefetch


def test_frontier_claims_only_a_contiguous_committed_prefix() -> None:
    f = _Frontier()
    for seq, last in enumerate(["a", "b", None, "d"]):
        f.register(seq, last)
    assert f.claim(1) is None  # 0 has not committed: 1 may not claim anything
    f.committed(1)
    assert f.position is None
    assert f.claim(0) == "b"  # 0 completes 0..1
    f.committed(0)
    assert f.position == "b"
    assert f.claim(3) == "b"  # 2 still open: 3 may claim what 0..1 committed, not its own "d"
    assert f.claim(2) == "b"  # 2 has no valid id; the prefix now ends at 2
    f.committed(2)
    assert f.claim(3) == "d"
    f.committed(3)
    assert f.position == "d"


def test_prefetch_hands_on_items_in_order_and_raises_the_producers_error() -> None:
    def items():
        yield from range(10)
        raise RuntimeError("stream broke")

    got = []
    try:
        for item in prefetch(items(), depth=2):
            got.append(item)
    except RuntimeError as exc:
        assert str(exc) == "stream broke"
    else:
        raise AssertionError("the error was swallowed")
    assert got == list(range(10))


def test_prefetch_stops_its_thread_when_the_consumer_stops() -> None:
    consumed = []
    gen = prefetch(iter(range(1000)), depth=3)
    assert isinstance(gen, Generator)
    for item in gen:
        consumed.append(item)
        if item == 5:
            break
    gen.close()
    assert consumed == list(range(6))


def test_sub_batches_never_separate_copies_of_one_id() -> None:
    from airflow_embedding_provider.pipeline import _sub_batches

    ids = ["a", "b", "c", "c", "c", "d", "e", "f", "f", "g"]
    # Cuts at 3 and 8 would separate the copies of "c" and of "f": they move past them.
    assert list(_sub_batches(ids, 3)) == [(0, 5), (5, 9), (9, 10)]
    assert list(_sub_batches(["x"] * 7, 2)) == [(0, 7)]
    assert list(_sub_batches([], 3)) == []
