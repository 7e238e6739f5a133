"""``GrpcCacheHook`` and its ``RetryPolicy`` against a real ``CacheService`` (the reference API server)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from airflow_embedding_provider.hooks.grpc_cache import (
    CACHE_SERVICE,
    DEFAULT_PORT,
    CacheInvalidationError,
    GrpcCacheHook,
    RetryPolicy,
)
from dev.api_server.service import CacheServicer, FaultPlan, QueryCache, build_server

FAST = {"initial_backoff": 0.05, "max_backoff": 0.1}


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Start a CacheService with the given faults, point ``cache_grpc_default`` at it, return the servicer."""
    servers: list[grpc.Server] = []

    def start(faults: FaultPlan | None = None, cache: QueryCache | None = None, timeout: float = 5) -> CacheServicer:
        servicer = CacheServicer(cache, faults=faults)
        server, port = build_server(servicer, host="127.0.0.1", port=0)
        server.start()
        servers.append(server)
        monkeypatch.setenv(
            "AIRFLOW_CONN_CACHE_GRPC_DEFAULT",
            json.dumps(
                {"conn_type": "embedding_grpc", "host": "127.0.0.1", "port": port, "extra": {"timeout": timeout}}
            ),
        )
        return servicer

    yield start
    for server in servers:
        server.stop(0)


def test_invalidate_drops_the_targets_entries(serve) -> None:
    cache = QueryCache()
    cache.get_or_load("recruit", "top-python", lambda: [1, 2, 3])
    cache.get_or_load("other", "k", lambda: 1)
    servicer = serve(cache=cache)
    hook = GrpcCacheHook()
    try:
        hook.invalidate("recruit")
    finally:
        hook.close()
    assert (cache.size("recruit"), cache.size("other")) == (0, 1)
    stats = servicer.stats()
    assert (stats.calls, stats.successes, stats.invalidations) == (1, 1, {"recruit": 1})


@pytest.mark.parametrize(
    ("fail_code", "code", "retryable"),
    [
        ("UNAVAILABLE", grpc.StatusCode.UNAVAILABLE, True),
        ("INTERNAL", grpc.StatusCode.INTERNAL, True),
        ("PERMISSION_DENIED", grpc.StatusCode.PERMISSION_DENIED, False),
        ("UNIMPLEMENTED", grpc.StatusCode.UNIMPLEMENTED, False),
    ],
)
def test_a_failed_call_says_whether_a_retry_may_help(serve, fail_code: str, code: grpc.StatusCode, retryable: bool):
    serve(FaultPlan(fail_always=True, fail_code=fail_code))
    hook = GrpcCacheHook()
    with pytest.raises(CacheInvalidationError) as info:
        hook.invalidate("recruit")
    hook.close()
    assert (info.value.code, info.value.retryable) == (code, retryable)
    assert f"InvalidateCache('recruit') at {hook.settings.target}" in str(info.value)
    assert f"failed with {code.name}" in str(info.value)
    assert ("not retried" in str(info.value)) is not retryable


def test_success_false_is_retryable(serve) -> None:
    serve(FaultPlan(fail_first=1, fail_code="SUCCESS_FALSE"))
    hook = GrpcCacheHook()
    with pytest.raises(CacheInvalidationError, match="answered success=false") as info:
        hook.invalidate("recruit")
    assert info.value.retryable and info.value.code is None
    hook.invalidate("recruit")  # the second call is not failed by the plan
    hook.close()


def test_the_deadline_cuts_a_slow_call(serve) -> None:
    servicer = serve(FaultPlan(delay=10))
    hook = GrpcCacheHook()
    with pytest.raises(CacheInvalidationError, match=r"no answer within the 0.3 s deadline") as info:
        hook.invalidate("recruit", timeout=0.3)
    hook.close()
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and info.value.retryable
    assert servicer.stats().successes == 0


def test_an_empty_target_is_refused_by_the_server_and_not_retried(serve) -> None:
    serve()
    hook = GrpcCacheHook()
    with pytest.raises(CacheInvalidationError) as info:
        hook.invalidate("")
    hook.close()
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and not info.value.retryable


def test_the_policy_retries_retryable_failures_until_a_call_succeeds(serve) -> None:
    servicer = serve(FaultPlan(fail_first=2))
    hook = GrpcCacheHook()
    waits: list[float] = []
    RetryPolicy(attempts=3, **FAST).run(
        lambda: hook.invalidate("recruit"),
        before_sleep=lambda state: waits.append(state.next_action.sleep if state.next_action else -1),
    )
    hook.close()
    stats = servicer.stats()
    assert (stats.calls, stats.successes) == (3, 1)
    assert len(waits) == 2 and all(0 < w <= 0.1 for w in waits)


def test_the_policy_gives_up_after_its_attempts_with_the_last_error(serve) -> None:
    servicer = serve(FaultPlan(fail_first=5))
    hook = GrpcCacheHook()
    with pytest.raises(CacheInvalidationError, match="UNAVAILABLE"):
        RetryPolicy(attempts=2, **FAST).run(lambda: hook.invalidate("recruit"))
    hook.close()
    assert servicer.stats().calls == 2


def test_the_policy_never_retries_an_error_a_retry_cannot_fix(serve) -> None:
    servicer = serve(FaultPlan(fail_always=True, fail_code="UNAUTHENTICATED"))
    hook = GrpcCacheHook()
    with pytest.raises(CacheInvalidationError, match="UNAUTHENTICATED"):
        RetryPolicy(attempts=3, **FAST).run(lambda: hook.invalidate("recruit"))
    hook.close()
    assert servicer.stats().calls == 1


def test_a_policy_needs_one_attempt() -> None:
    with pytest.raises(ValueError, match="attempts must be at least 1, got 0"):
        RetryPolicy(attempts=0)


def test_health_and_test_connection_ask_for_the_cache_service(serve) -> None:
    serve()
    hook = GrpcCacheHook()
    assert hook.health() == "SERVING" and hook.service_name == CACHE_SERVICE
    assert hook.test_connection() == (True, f"{hook.settings.target}: SERVING")


def test_a_connection_without_a_port_uses_the_api_servers_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_CACHE_GRPC_DEFAULT", json.dumps({"conn_type": "embedding_grpc", "host": "api"}))
    assert GrpcCacheHook().settings.target == f"api:{DEFAULT_PORT}"
