"""Server security settings, the bearer-token interceptor and the client's token handling, without a network."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from airflow_embedding_provider.cli import build_parser
from airflow_embedding_provider.get_provider_info import get_provider_info
from airflow_embedding_provider.hooks.grpc_channel import ChannelSettings
from airflow_embedding_provider.security import (
    TOKEN_ENV,
    UNAUTHENTICATED_MESSAGE,
    BearerTokenInterceptor,
    ServerSecurity,
    add_cli_options,
    read_token_file,
)
from dev.cli import build_parser as build_dev_parser

TOKEN = "tok-unit-Zx81"


class AbortedError(Exception):
    pass


class FakeContext:
    """Records ``abort`` like gRPC does: it raises."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise AbortedError


def _details(method: str, metadata: list[tuple[str, Any]] | None = None) -> Any:
    return SimpleNamespace(method=method, invocation_metadata=tuple(metadata or ()))


def _intercept(method: str, metadata: list[tuple[str, Any]] | None, handler: grpc.RpcMethodHandler) -> Any:
    return BearerTokenInterceptor(TOKEN).intercept_service(lambda _details: handler, _details(method, metadata))


UNARY = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")


def test_the_right_token_passes_the_real_handler() -> None:
    assert _intercept("/svc/M", [("authorization", f"Bearer {TOKEN}")], UNARY) is UNARY
    assert _intercept("/svc/M", [("x-other", "1"), ("authorization", f"Bearer {TOKEN}".encode())], UNARY) is UNARY


@pytest.mark.parametrize(
    "metadata",
    [
        [],
        [("authorization", "Bearer wrong")],
        [("authorization", TOKEN)],  # no scheme
        [("authorization", f"Basic {TOKEN}")],
        [("authorization", f"Bearer {TOKEN}x")],
        [("x-token", TOKEN)],
    ],
    ids=["missing", "wrong", "no-scheme", "basic", "longer", "other-key"],
)
def test_anything_else_is_unauthenticated_without_echoing_the_token(metadata: list[tuple[str, str]]) -> None:
    handler = _intercept("/svc/M", metadata, UNARY)
    assert handler is not UNARY
    context = FakeContext()
    with pytest.raises(AbortedError):
        handler.unary_unary(b"", context)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert context.details == UNAUTHENTICATED_MESSAGE
    assert TOKEN not in (context.details or "")


@pytest.mark.parametrize(
    "factory",
    [
        grpc.unary_unary_rpc_method_handler,
        grpc.unary_stream_rpc_method_handler,
        grpc.stream_unary_rpc_method_handler,
        grpc.stream_stream_rpc_method_handler,
    ],
)
def test_the_refusal_keeps_the_shape_and_codecs_of_the_method(factory: Any) -> None:
    original = factory(lambda request, context: None, request_deserializer=bytes.upper, response_serializer=bytes)
    refused = _intercept("/svc/M", [], original)
    assert (refused.request_streaming, refused.response_streaming) == (
        original.request_streaming,
        original.response_streaming,
    )
    assert refused.request_deserializer is bytes.upper and refused.response_serializer is bytes


def test_health_checks_and_unknown_methods_pass_through() -> None:
    assert _intercept("/grpc.health.v1.Health/Check", [], UNARY) is UNARY
    assert _intercept("/grpc.health.v1.Health/Watch", None, UNARY) is UNARY
    assert BearerTokenInterceptor(TOKEN).intercept_service(lambda _d: None, _details("/svc/Nope")) is None


def test_the_interceptor_and_settings_never_show_the_token() -> None:
    assert TOKEN not in repr(BearerTokenInterceptor(TOKEN))
    security = ServerSecurity(token=TOKEN)
    assert TOKEN not in repr(security) and TOKEN not in security.describe()
    assert security.describe() == "plaintext, bearer token required"
    with pytest.raises(ValueError, match="empty"):
        BearerTokenInterceptor("")


def test_server_security_checks_its_settings(tmp_path: Path) -> None:
    cert, key, ca = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    with pytest.raises(ValueError, match="both a certificate and its private key"):
        ServerSecurity(cert=cert)
    with pytest.raises(ValueError, match="both a certificate and its private key"):
        ServerSecurity(key=key)
    with pytest.raises(ValueError, match="needs the server's own"):
        ServerSecurity(client_ca=ca)
    with pytest.raises(ValueError, match="token is empty"):
        ServerSecurity(token="")
    with pytest.raises(ValueError, match="no TLS certificate"):
        ServerSecurity().credentials()
    assert ServerSecurity().interceptors() == []
    assert ServerSecurity(cert=cert, key=key, client_ca=ca).describe() == "mutual TLS, no token"
    assert ServerSecurity(cert=cert, key=key).describe() == "TLS, no token"


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_options(parser)
    return parser.parse_args(argv)


def test_from_args_reads_the_token_file_then_the_environment(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n", encoding="utf-8")
    args = _parse(
        "--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem", "--token-file", str(token_file)
    )
    security = ServerSecurity.from_args(args, environ={TOKEN_ENV: "from-env"})
    assert security == ServerSecurity(cert=Path("c.pem"), key=Path("k.pem"), client_ca=Path("ca.pem"), token=TOKEN)
    assert ServerSecurity.from_args(_parse(), environ={TOKEN_ENV: "from-env"}).token == "from-env"
    assert ServerSecurity.from_args(_parse(), environ={TOKEN_ENV: ""}) == ServerSecurity()
    assert ServerSecurity.from_args(argparse.Namespace(), environ={}) == ServerSecurity()


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        read_token_file(empty)


@pytest.mark.parametrize(
    ("build_parser", "command"),
    [
        (build_parser, ["ai-server", "--pkl", "x.pkl"]),
        (build_dev_parser, ["api-server"]),
        (build_parser, ["upload-server", "--postgres-dsn", "postgresql://"]),
    ],
)
def test_both_server_commands_take_the_security_options(
    build_parser: Callable[[], argparse.ArgumentParser], command: list[str]
) -> None:
    args = build_parser().parse_args(
        [*command, "--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca", "--token-file", "t"]
    )
    assert (args.tls_cert, args.tls_key, args.tls_client_ca, args.token_file) == tuple(
        Path(p) for p in ("c", "k", "ca", "t")
    )
    plain = build_parser().parse_args(command)
    assert (plain.tls_cert, plain.tls_key, plain.tls_client_ca, plain.token_file) == (None, None, None, None)


def test_channel_settings_hide_the_token_and_send_it_the_right_way() -> None:
    plain = ChannelSettings(target="h:1", token=TOKEN)
    assert TOKEN not in repr(plain) and TOKEN not in str(plain)
    assert plain.metadata() == [("authorization", f"Bearer {TOKEN}")]
    # On TLS the channel's call credentials carry it; metadata would send it twice.
    assert ChannelSettings(target="h:1", use_tls=True, token=TOKEN).metadata() == []
    assert ChannelSettings(target="h:1").metadata() == []


def test_channel_settings_read_tls_server_name_from_the_connection() -> None:
    conn = SimpleNamespace(
        conn_id="c",
        host="10.0.0.2",
        port=9,
        password=None,
        extra_dejson={"use_tls": "true", "tls_server_name": "embedding.test", "token": TOKEN},
    )
    settings = ChannelSettings.from_connection(conn, default_port=1)
    assert (settings.tls_server_name, settings.use_tls, settings.token) == ("embedding.test", True, TOKEN)
    assert ChannelSettings.from_connection(SimpleNamespace(**{**vars(conn), "extra_dejson": {}}), default_port=1) == (
        ChannelSettings(target="10.0.0.2:9")
    )


def test_the_connection_form_has_the_tls_server_name_field() -> None:
    fields = get_provider_info()["connection-types"][0]["conn-fields"]
    assert fields["tls_server_name"]["schema"] == {"type": ["string", "null"]}
    assert fields["token"]["schema"]["format"] == "password"
