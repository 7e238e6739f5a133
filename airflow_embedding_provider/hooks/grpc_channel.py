"""Channel settings read from an Airflow connection, shared by the provider's gRPC hooks."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from airflow_embedding_provider.wire.contract import (
    DEFAULT_CALL_TIMEOUT,
    KEEPALIVE_SECONDS,
    KEEPALIVE_TIMEOUT_SECONDS,
    MAX_RECEIVE_MESSAGE_BYTES,
)

log = logging.getLogger(__name__)


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@dataclass(frozen=True)
class ChannelSettings:
    """Where and how to reach a gRPC server.

    :param target: ``host:port``.
    :param use_tls: TLS on; ``ca_cert`` verifies the server, ``client_cert``/``client_key`` add mTLS.
    :param token: sent as ``authorization: Bearer <token>`` on every call: as call credentials on a
        TLS channel, as plain metadata on a plaintext one (gRPC sends call credentials over TLS only).
        Never part of the ``repr``.
    :param timeout: seconds for unary calls and for waiting until the channel is ready.
    :param tls_server_name: the name the server's certificate is checked against instead of the
        host (``grpc.ssl_target_name_override``), e.g. for test certificates or an IP address target.
    """

    target: str
    use_tls: bool = False
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    token: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_CALL_TIMEOUT
    tls_server_name: str | None = None

    @classmethod
    def from_connection(cls, conn: Any, *, default_port: int) -> ChannelSettings:
        """From an Airflow ``Connection`` of type ``embedding_grpc`` (extras: see provider info)."""
        extra = conn.extra_dejson or {}
        if not conn.host:
            raise ValueError(f"connection {conn.conn_id!r} has no host")
        timeout = extra.get("timeout")
        token = extra.get("token") or conn.password or None
        if not token and extra.get("token_file"):
            token = _read_token(str(extra["token_file"]), conn.conn_id)
        return cls(
            target=f"{conn.host}:{conn.port or default_port}",
            use_tls=_flag(extra.get("use_tls", False)),
            ca_cert=extra.get("ca_cert") or None,
            client_cert=extra.get("client_cert") or None,
            client_key=extra.get("client_key") or None,
            token=token,
            timeout=float(timeout) if timeout not in (None, "") else DEFAULT_CALL_TIMEOUT,
            tls_server_name=extra.get("tls_server_name") or None,
        )

    def metadata(self) -> list[tuple[str, str]]:
        """Per-call metadata: the token on a plaintext channel; TLS channels carry it as call credentials."""
        return [("authorization", f"Bearer {self.token}")] if self.token and not self.use_tls else []

    def open_channel(self) -> grpc.Channel:
        if self.token and not self.use_tls:
            # Anyone on the path can read a token sent in plaintext, and replay it.
            log.warning(
                "sending the bearer token to %s over a plaintext channel: anyone on the network path can read "
                "it; set use_tls (and ca_cert) on the connection for anything beyond a private network",
                self.target,
            )
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_RECEIVE_MESSAGE_BYTES),
            # Notice a dead peer on a long stream within about 40 s instead of hanging.
            ("grpc.keepalive_time_ms", int(KEEPALIVE_SECONDS * 1000)),
            ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_SECONDS * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
        ]
        if not self.use_tls:
            return grpc.insecure_channel(self.target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_cert).read_bytes() if self.ca_cert else None,
            private_key=Path(self.client_key).read_bytes() if self.client_key else None,
            certificate_chain=Path(self.client_cert).read_bytes() if self.client_cert else None,
        )
        if self.token:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(self.token)
            )
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return grpc.secure_channel(self.target, credentials, options=options)


def _read_token(path: str, conn_id: str) -> str:
    """The token in the file an ``embedding_grpc`` connection's ``token_file`` extra names."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"connection {conn_id!r}: cannot read token_file {path!r}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"connection {conn_id!r}: token_file {path!r} is empty")
    return token
