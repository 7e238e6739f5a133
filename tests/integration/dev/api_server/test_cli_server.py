"""``python -m dev api-server`` as a real process: health, counters, injected faults, shutdown."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airflow_embedding_provider.hooks.grpc_cache import CacheInvalidationError, GrpcCacheHook
from dev.api_server.service import SERVICE_NAME, read_stats
from dev.stack import ServerProcess


def _hook(monkeypatch: pytest.MonkeyPatch, target: str) -> GrpcCacheHook:
    host, port = target.rsplit(":", 1)
    monkeypatch.setenv(
        "AIRFLOW_CONN_CACHE_GRPC_DEFAULT",
        json.dumps({"conn_type": "embedding_grpc", "host": host, "port": int(port), "extra": {"timeout": 5}}),
    )
    return GrpcCacheHook()


def test_serves_health_and_counts_calls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    stats_file = tmp_path / "stats.json"
    server = ServerProcess(["api-server", "--stats-file", str(stats_file), "--fail-first", "1"]).start()
    try:
        with grpc.insecure_channel(server.target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        hook = _hook(monkeypatch, server.target)
        assert hook.test_connection() == (True, f"{server.target}: SERVING")
        with pytest.raises(CacheInvalidationError, match="failed with UNAVAILABLE: injected failure of call 1") as err:
            hook.invalidate("recruit")
        assert err.value.retryable
        hook.invalidate("recruit")
        hook.close()
        stats = read_stats(stats_file)
        assert (stats.calls, stats.failures, stats.successes, stats.invalidations) == (2, 1, 1, {"recruit": 1})
    finally:
        assert server.stop() == 0  # SIGTERM: a clean shutdown


def test_non_retryable_and_success_false_are_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    with ServerProcess(["api-server", "--fail-first", "1", "--fail-code", "PERMISSION_DENIED"]) as server:
        hook = _hook(monkeypatch, server.target)
        with pytest.raises(CacheInvalidationError, match=r"PERMISSION_DENIED.*not retried") as err:
            hook.invalidate("recruit")
        assert not err.value.retryable and err.value.code == grpc.StatusCode.PERMISSION_DENIED
        hook.close()
    with ServerProcess(["api-server", "--fail-always", "--fail-code", "SUCCESS_FALSE"]) as server:
        hook = _hook(monkeypatch, server.target)
        with pytest.raises(CacheInvalidationError, match="answered success=false") as err:
            hook.invalidate("recruit")
        assert err.value.retryable
        hook.close()


def test_a_bad_fault_option_is_refused() -> None:
    from dev.cli import main

    assert main(["api-server", "--fail-code", "SOMETIMES", "--port", "0"]) == 1
