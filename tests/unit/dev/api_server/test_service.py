"""The reference CacheService in process: counters, stats file, injected faults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from airflow_embedding_provider.wire import embedding_pb2, embedding_pb2_grpc
from dev.api_server.service import (
    SUCCESS_FALSE,
    CacheServicer,
    FaultPlan,
    QueryCache,
    build_server,
    read_stats,
)


def _serve(servicer: CacheServicer) -> Iterator[embedding_pb2_grpc.CacheServiceStub]:
    server, port = build_server(servicer, host="127.0.0.1", port=0)
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield embedding_pb2_grpc.CacheServiceStub(channel)
    server.stop(0)


def _invalidate(stub: embedding_pb2_grpc.CacheServiceStub, target: str = "recruit", timeout: float = 10) -> bool:
    return bool(stub.InvalidateCache(embedding_pb2.CacheInvalidateRequest(target=target), timeout=timeout).success)


def test_query_cache_drops_a_target_only() -> None:
    cache = QueryCache()
    assert cache.get_or_load("recruit", "q1", lambda: [1]) == [1]
    assert cache.get_or_load("recruit", "q1", lambda: [2]) == [1]  # served from the cache
    cache.get_or_load("company", "q1", lambda: [3])
    assert cache.invalidate("recruit") == 1 and cache.invalidate("recruit") == 0
    assert cache.size("recruit") == 0 and cache.size("company") == 1


def test_fault_plan() -> None:
    plan = FaultPlan(fail_first=2, delay=1.5, delay_first=1)
    assert [plan.fails(n) for n in (1, 2, 3)] == [True, True, False]
    assert [plan.delay_for(n) for n in (1, 2)] == [1.5, 0.0]
    assert FaultPlan(delay=2).delay_for(99) == 2 and FaultPlan(fail_always=True).fails(99)
    with pytest.raises(ValueError, match="neither a gRPC status code name"):
        FaultPlan(fail_code="NOPE")


def test_invalidation_drops_entries_and_writes_stats(tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    servicer = CacheServicer(stats_file=stats_file)
    assert read_stats(stats_file).calls == 0  # written at start, so a reader never waits for a first call
    servicer.cache.get_or_load("recruit", "top-10", lambda: ["a"])
    for stub in _serve(servicer):
        assert _invalidate(stub) and _invalidate(stub)
    stats = read_stats(stats_file)
    assert (stats.calls, stats.successes, stats.failures, stats.dropped_entries) == (2, 2, 0, 1)
    assert stats.invalidations == {"recruit": 2}


def test_fail_first_then_answer(tmp_path: Path) -> None:
    servicer = CacheServicer(faults=FaultPlan(fail_first=2, fail_code="RESOURCE_EXHAUSTED"))
    for stub in _serve(servicer):
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                _invalidate(stub)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _invalidate(stub)
    assert (servicer.stats().calls, servicer.stats().failures, servicer.stats().successes) == (3, 2, 1)


def test_success_false_and_empty_target() -> None:
    servicer = CacheServicer(faults=FaultPlan(fail_always=True, fail_code=SUCCESS_FALSE))
    for stub in _serve(servicer):
        assert _invalidate(stub) is False
        with pytest.raises(grpc.RpcError) as err:
            _invalidate(stub, target="")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "target is empty" in (err.value.details() or "")
    assert servicer.stats().successes == 0


def test_a_delayed_call_cut_by_the_deadline_is_abandoned() -> None:
    servicer = CacheServicer(faults=FaultPlan(delay=30, delay_first=1))
    for stub in _serve(servicer):
        with pytest.raises(grpc.RpcError) as err:
            _invalidate(stub, timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _invalidate(stub)
    stats = servicer.stats()
    assert (stats.calls, stats.successes, stats.abandoned) == (2, 1, 1)
