"""``ChannelSettings``: what it reads from a connection, and the channel it opens to a real gRPC server."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from airflow_embedding_provider.hooks.grpc_channel import ChannelSettings
from airflow_embedding_provider.wire.contract import MAX_RECEIVE_MESSAGE_BYTES as MAX_MESSAGE_BYTES

ECHO = "/test.Echo/Echo"
#: Above gRPC's default 4 MiB and below the channel's limit.
LARGE = 6 * 1024 * 1024


def _identity(data: bytes) -> bytes:
    return data


@pytest.fixture
def echo_server() -> Iterator[tuple[str, list[list[tuple[str, Any]]]]]:
    """A raw-bytes echo server that accepts large messages; yields its target and the metadata it saw."""
    seen: list[list[tuple[str, Any]]] = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(list(context.invocation_metadata()))
        return request

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", -1)],
    )
    handler = grpc.unary_unary_rpc_method_handler(echo, request_deserializer=_identity, response_serializer=_identity)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Echo": handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", seen
    server.stop(0)


def _call(channel: grpc.Channel, payload: bytes, metadata: list[tuple[str, str]] | None = None) -> bytes:
    call = channel.unary_unary(ECHO, request_serializer=_identity, response_deserializer=_identity)
    return bytes(call(payload, timeout=30, metadata=metadata))


def test_the_channel_carries_messages_above_grpcs_default_limit(echo_server) -> None:
    target, _ = echo_server
    payload = bytes(range(256)) * (LARGE // 256)
    with ChannelSettings(target=target).open_channel() as channel:
        assert _call(channel, payload) == payload
    # A channel with gRPC's defaults refuses the same answer: the options above are what carry it.
    with grpc.insecure_channel(target) as plain, pytest.raises(grpc.RpcError) as info:
        _call(plain, payload)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_plaintext_channel_sends_the_token_as_metadata(echo_server) -> None:
    target, seen = echo_server
    settings = ChannelSettings(target=target, token="s3cret")
    with settings.open_channel() as channel:
        _call(channel, b"x", metadata=settings.metadata())
    assert ("authorization", "Bearer s3cret") in seen[-1]


def _connection(**fields: Any) -> SimpleNamespace:
    base: dict[str, Any] = {"conn_id": "c", "host": "ai", "port": None, "password": None, "extra_dejson": {}}
    return SimpleNamespace(**(base | fields))


def test_a_connection_without_a_host_is_refused_with_its_id() -> None:
    with pytest.raises(ValueError, match="connection 'c' has no host"):
        ChannelSettings.from_connection(_connection(host=""), default_port=1)


def test_the_default_port_and_timeout_apply_when_the_connection_has_none() -> None:
    settings = ChannelSettings.from_connection(_connection(extra_dejson={"timeout": ""}), default_port=50051)
    assert (settings.target, settings.timeout, settings.use_tls, settings.token) == ("ai:50051", 30.0, False, None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("Yes", True),
        (" on ", True),
        ("1", True),
        (True, True),
        ("false", False),
        ("0", False),
        ("", False),
        (False, False),
    ],
)
def test_use_tls_reads_form_values_and_text(value: object, expected: bool) -> None:
    settings = ChannelSettings.from_connection(_connection(extra_dejson={"use_tls": value}), default_port=1)
    assert settings.use_tls is expected


def test_the_token_falls_back_to_the_connections_password() -> None:
    from_password = ChannelSettings.from_connection(_connection(password="pw"), default_port=1)
    from_extra = ChannelSettings.from_connection(
        _connection(password="pw", extra_dejson={"token": "t"}), default_port=1
    )
    assert (from_password.token, from_extra.token) == ("pw", "t")
