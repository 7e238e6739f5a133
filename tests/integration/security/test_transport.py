"""TLS, mutual TLS and bearer tokens between the hooks and real servers, with certificates made at test time."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.ai_server.service import SERVICE_NAME as EMBEDDING_SERVICE
from airflow_embedding_provider.ai_server.service import build_server as build_ai_server
from airflow_embedding_provider.grpc_server import bind_port, new_server
from airflow_embedding_provider.hooks.grpc_cache import CacheInvalidationError, GrpcCacheHook
from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
from airflow_embedding_provider.security import UNAUTHENTICATED_MESSAGE, ServerSecurity
from dev.api_server.service import CacheServicer
from dev.api_server.service import build_server as build_api_server
from tests.integration.security.pki import SERVER_NAME, Pki


def _security(pki: Pki, *, mutual: bool = False, token: str | None = None) -> ServerSecurity:
    return ServerSecurity(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca if mutual else None, token=token)


@pytest.fixture
def servers() -> Iterator[list[grpc.Server]]:
    """Servers a test starts; each stopped at the end."""
    started: list[grpc.Server] = []
    yield started
    for server in started:
        server.stop(0)


def _ai(servers: list[grpc.Server], dataset: EmbeddingDataset, security: ServerSecurity | None) -> str:
    server, port = build_ai_server(dataset, host="127.0.0.1", port=0, security=security)
    server.start()
    servers.append(server)
    return f"127.0.0.1:{port}"


def _conn(monkeypatch: pytest.MonkeyPatch, conn_id: str, target: str, **extra: Any) -> None:
    host, port = target.rsplit(":", 1)
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        json.dumps({"conn_type": "embedding_grpc", "host": host, "port": int(port), "extra": {"timeout": 5, **extra}}),
    )


def _tls_extra(pki: Pki, *, mutual: bool = False, token: str | None = None) -> dict[str, Any]:
    extra: dict[str, Any] = {"use_tls": True, "ca_cert": str(pki.ca)}
    if mutual:
        extra |= {"client_cert": str(pki.client_cert), "client_key": str(pki.client_key)}
    if token is not None:
        extra["token"] = token
    return extra


def _hook(monkeypatch: pytest.MonkeyPatch, target: str, **extra: Any) -> GrpcEmbeddingHook:
    _conn(monkeypatch, "embedding_grpc_sec", target, **extra)
    return GrpcEmbeddingHook("embedding_grpc_sec")


def _plan(hook: GrpcEmbeddingHook) -> int:
    try:
        return hook.plan_partitions(after=None, rows_per_partition=1000, max_partitions=8)[1]
    finally:
        hook.close()


def test_tls_with_token_streams_and_tests_the_connection(
    monkeypatch: pytest.MonkeyPatch, servers: list[grpc.Server], sample_dataset: EmbeddingDataset, pki: Pki, token: str
) -> None:
    target = _ai(servers, sample_dataset, _security(pki, token=token))
    hook = _hook(monkeypatch, target, **_tls_extra(pki, token=token))
    assert hook.test_connection() == (True, f"{target}: SERVING")
    chunks = list(hook.stream_chunks(after=sample_dataset.ids[2499], chunk_size=200))
    hook.close()
    assert [i for c in chunks for i in c.ids] == sample_dataset.ids[2500:]
    assert _plan(hook) == len(sample_dataset)
    assert token not in repr(hook.settings)


def test_mutual_tls_with_token(
    monkeypatch: pytest.MonkeyPatch, servers: list[grpc.Server], sample_dataset: EmbeddingDataset, pki: Pki, token: str
) -> None:
    target = _ai(servers, sample_dataset, _security(pki, mutual=True, token=token))
    hook = _hook(monkeypatch, target, **_tls_extra(pki, mutual=True, token=token))
    assert hook.test_connection() == (True, f"{target}: SERVING")
    assert _plan(hook) == len(sample_dataset)


def test_mutual_tls_refuses_a_client_without_a_certificate(
    monkeypatch: pytest.MonkeyPatch, servers: list[grpc.Server], sample_dataset: EmbeddingDataset, pki: Pki, token: str
) -> None:
    target = _ai(servers, sample_dataset, _security(pki, mutual=True, token=token))
    ok, message = _hook(monkeypatch, target, **_tls_extra(pki, token=token)).test_connection()
    assert not ok and "UNAVAILABLE" in message
    assert token not in message


def test_mutual_tls_refuses_a_client_certificate_of_another_ca(
    monkeypatch: pytest.MonkeyPatch,
    servers: list[grpc.Server],
    sample_dataset: EmbeddingDataset,
    pki: Pki,
    other_pki: Pki,
) -> None:
    target = _ai(servers, sample_dataset, _security(pki, mutual=True))
    extra = _tls_extra(pki) | {"client_cert": str(other_pki.client_cert), "client_key": str(other_pki.client_key)}
    ok, message = _hook(monkeypatch, target, **extra).test_connection()
    assert not ok and "UNAVAILABLE" in message


def test_a_client_trusting_another_ca_refuses_the_server(
    monkeypatch: pytest.MonkeyPatch,
    servers: list[grpc.Server],
    sample_dataset: EmbeddingDataset,
    pki: Pki,
    other_pki: Pki,
    token: str,
) -> None:
    target = _ai(servers, sample_dataset, _security(pki, token=token))
    ok, message = _hook(monkeypatch, target, **_tls_extra(other_pki, token=token)).test_connection()
    assert not ok and "UNAVAILABLE" in message
    assert token not in message


def test_a_plaintext_client_cannot_talk_to_a_tls_server(
    monkeypatch: pytest.MonkeyPatch, servers: list[grpc.Server], sample_dataset: EmbeddingDataset, pki: Pki
) -> None:
    target = _ai(servers, sample_dataset, _security(pki))
    ok, message = _hook(monkeypatch, target).test_connection()
    assert not ok and "UNAVAILABLE" in message


def test_tls_server_name_checks_the_certificate_against_that_name(
    monkeypatch: pytest.MonkeyPatch, servers: list[grpc.Server], sample_dataset: EmbeddingDataset, pki: Pki
) -> None:
    target = _ai(servers, sample_dataset, _security(pki))
    assert _hook(monkeypatch, target, **_tls_extra(pki), tls_server_name=SERVER_NAME).test_connection()[0]
    ok, message = _hook(monkeypatch, target, **_tls_extra(pki), tls_server_name="elsewhere.test").test_connection()
    assert not ok and "UNAVAILABLE" in message


@pytest.mark.parametrize("presented", [None, "wrong-token"], ids=["missing", "wrong"])
def test_a_missing_or_wrong_token_is_unauthenticated(
    monkeypatch: pytest.MonkeyPatch,
    servers: list[grpc.Server],
    sample_dataset: EmbeddingDataset,
    pki: Pki,
    token: str,
    presented: str | None,
) -> None:
    target = _ai(servers, sample_dataset, _security(pki, mutual=True, token=token))
    hook = _hook(monkeypatch, target, **_tls_extra(pki, mutual=True, token=presented))
    # Health stays open: the Test button and probes work without the token.
    assert hook.test_connection() == (True, f"{target}: SERVING")
    with pytest.raises(grpc.RpcError) as err:
        _plan(hook)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == UNAUTHENTICATED_MESSAGE
    with pytest.raises(grpc.RpcError) as stream_err:
        list(hook.stream_chunks(after=None, chunk_size=100))
    hook.close()
    assert stream_err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for text in (str(err.value), repr(err.value), str(stream_err.value)):
        assert token not in text and "wrong-token" not in text


def test_the_token_works_on_a_plaintext_channel_too(
    monkeypatch: pytest.MonkeyPatch, servers: list[grpc.Server], sample_dataset: EmbeddingDataset, token: str
) -> None:
    # No TLS: the token travels as metadata (gRPC sends call credentials over TLS only).
    target = _ai(servers, sample_dataset, ServerSecurity(token=token))
    assert _plan(_hook(monkeypatch, target, token=token)) == len(sample_dataset)
    with pytest.raises(grpc.RpcError) as err:
        _plan(_hook(monkeypatch, target))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_answers_without_a_token_over_mutual_tls(
    servers: list[grpc.Server], sample_dataset: EmbeddingDataset, pki: Pki, token: str
) -> None:
    target = _ai(servers, sample_dataset, _security(pki, mutual=True, token=token))
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    with grpc.secure_channel(target, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", EMBEDDING_SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_cache_hook_over_mutual_tls_with_token(
    monkeypatch: pytest.MonkeyPatch, servers: list[grpc.Server], pki: Pki, token: str
) -> None:
    servicer = CacheServicer()
    server, port = build_api_server(
        servicer, host="127.0.0.1", port=0, security=_security(pki, mutual=True, token=token)
    )
    server.start()
    servers.append(server)
    target = f"127.0.0.1:{port}"
    _conn(monkeypatch, "cache_grpc_default", target, **_tls_extra(pki, mutual=True, token=token))
    hook = GrpcCacheHook()
    assert hook.test_connection() == (True, f"{target}: SERVING")
    hook.invalidate("recruit")
    assert servicer.stats().successes == 1

    _conn(monkeypatch, "cache_grpc_default", target, **_tls_extra(pki, mutual=True, token="not-" + token))
    with pytest.raises(CacheInvalidationError, match=f"UNAUTHENTICATED: {UNAUTHENTICATED_MESSAGE}") as err:
        GrpcCacheHook().invalidate("recruit")
    assert not err.value.retryable
    assert token not in str(err.value)
    assert servicer.stats().calls == 1  # refused before the servicer


def _echo(request: Any, context: grpc.ServicerContext) -> bytes:
    return b"ok"


def _echo_stream(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield b"ok"


HANDLERS = {
    "UnaryUnary": grpc.unary_unary_rpc_method_handler(_echo),
    "UnaryStream": grpc.unary_stream_rpc_method_handler(_echo_stream),
    "StreamUnary": grpc.stream_unary_rpc_method_handler(_echo),
    "StreamStream": grpc.stream_stream_rpc_method_handler(_echo_stream),
}


@pytest.fixture
def echo_server(servers: list[grpc.Server], pki: Pki, token: str) -> str:
    """A server with one method of each arity, behind TLS and the token check (like the upload server)."""
    from concurrent import futures

    security = _security(pki, token=token)
    server = new_server(futures.ThreadPoolExecutor(max_workers=4), security=security)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", HANDLERS),))
    port = bind_port(server, "127.0.0.1", 0, security)
    server.start()
    servers.append(server)
    return f"127.0.0.1:{port}"


def _call(channel: grpc.Channel, method: str) -> list[bytes]:
    path = f"/test.Echo/{method}"
    requests = iter([b"a", b"b"])
    if method == "UnaryUnary":
        return [channel.unary_unary(path)(b"a", timeout=10)]
    if method == "UnaryStream":
        return list(channel.unary_stream(path)(b"a", timeout=10))
    if method == "StreamUnary":
        return [channel.stream_unary(path)(requests, timeout=10)]
    return list(channel.stream_stream(path)(requests, timeout=10))


@pytest.mark.parametrize("method", sorted(HANDLERS))
def test_every_call_shape_is_checked(echo_server: str, pki: Pki, token: str, method: str, tmp_path: Path) -> None:
    tls = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with grpc.secure_channel(echo_server, tls) as channel, pytest.raises(grpc.RpcError) as err:
        _call(channel, method)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == UNAUTHENTICATED_MESSAGE
    with_token = grpc.composite_channel_credentials(tls, grpc.access_token_call_credentials(token))
    with grpc.secure_channel(echo_server, with_token) as channel:
        assert _call(channel, method) == [b"ok"]


def test_upload_server_refuses_an_upload_without_the_token(servers: list[grpc.Server], pki: Pki, token: str) -> None:
    from airflow_embedding_provider.upload_server.service import SERVICE_NAME as UPLOAD_SERVICE
    from airflow_embedding_provider.upload_server.service import UploadServicer
    from airflow_embedding_provider.upload_server.service import build_server as build_upload_server

    def no_database() -> Any:
        raise AssertionError("a refused upload must not reach the database")

    security = _security(pki, mutual=True, token=token)
    server, port, _health = build_upload_server(
        UploadServicer(no_database), host="127.0.0.1", port=0, security=security
    )
    server.start()
    servers.append(server)
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=UPLOAD_SERVICE), timeout=10
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            channel.stream_unary(f"/{UPLOAD_SERVICE}/UploadEmbeddings")(iter([b""]), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.value.details() == UNAUTHENTICATED_MESSAGE


def test_push_reaches_an_upload_server_over_mutual_tls_with_a_token(
    pki: Pki, token: str, token_file: Path, pg_dsn: str, sample_pkl: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from dev.stack import HealthTLS, ServerProcess

    command = ["upload-server", "--postgres-dsn", pg_dsn, *pki.server_options(token_file)]
    health = HealthTLS(ca=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key)
    with ServerProcess(command, log_path=tmp_path / "upload.log", health_tls=health) as server:
        base = [
            sys.executable,
            "-m",
            "airflow_embedding_provider.cli",
            "push",
            "--pkl",
            str(sample_pkl),
            "--target",
            server.target,
            "--tls-ca",
            str(pki.ca),
            "--tls-cert",
            str(pki.client_cert),
            "--tls-key",
            str(pki.client_key),
        ]
        refused = subprocess.run(base, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        pushed = subprocess.run([*base, "--token-file", str(token_file)], capture_output=True, text=True, timeout=300)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith("pushed 3000 rows")
    assert token not in pushed.stdout + pushed.stderr + refused.stderr + (tmp_path / "upload.log").read_text()
