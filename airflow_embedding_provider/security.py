"""Transport security shared by every gRPC server of the package: TLS, mutual TLS and a bearer token.

The bottom layer: it imports nothing from hooks, operators or servers. Each server (AI server,
API server, upload server) builds its ``grpc.Server`` with these settings through
:mod:`airflow_embedding_provider.grpc_server`. The client side lives in
:mod:`airflow_embedding_provider.hooks.grpc_channel`.

* TLS: ``cert`` and ``key`` (PEM paths) make the port a TLS port.
* mTLS: ``client_ca`` (PEM path) also requires a client certificate signed by that CA.
* Token: every call must carry ``authorization: Bearer <token>``; otherwise it ends with
  ``UNAUTHENTICATED``. The health service stays open so that probes need no secret.
* Exposure: a server refuses to listen beyond the loopback interface without a token (anyone who
  reaches the port could read the whole dataset or overwrite vectors), unless told ``--insecure``.

The token is never logged, echoed in an error or shown in a ``repr``.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

#: Environment variable read for the token when no ``--token-file`` is given.
TOKEN_ENV = "EMBEDDING_GRPC_TOKEN"
#: Calls under this prefix (``Check``, ``Watch``) skip the token check so that probes work.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"


def read_token_file(path: str | Path) -> str:
    """The token in ``path``, surrounding whitespace (a trailing newline) removed.

    :param path: a file holding only the token.
    :raises ValueError: the file is empty; its content is never part of the message.
    """
    token = Path(path).read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {str(path)!r} is empty")
    return token


@dataclass(frozen=True)
class ServerSecurity:
    """How a server protects its port.

    :param cert: PEM certificate chain of the server; with ``key``, the port speaks TLS.
    :param key: PEM private key of ``cert``.
    :param client_ca: PEM CA bundle; clients must present a certificate it signed (mutual TLS).
    :param token: the bearer token every call except health checks must carry.
    :param insecure: allow listening beyond loopback without a token (``--insecure``).
    """

    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    # repr=False: a logged or printed settings object must not carry the secret.
    token: str | None = field(default=None, repr=False)
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both a certificate and its private key (--tls-cert and --tls-key)")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("mutual TLS (--tls-client-ca) needs the server's own --tls-cert and --tls-key")
        if self.token is not None and not self.token:
            raise ValueError("the bearer token is empty")

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def mutual_tls(self) -> bool:
        return self.client_ca is not None

    def check_exposure(self, host: str) -> None:
        """Refuse ``host`` beyond loopback without a token, unless :attr:`insecure`.

        :raises ValueError: with what to do; the CLI prints it as one line.
        """
        if self.token or self.insecure or is_loopback(host):
            return
        raise ValueError(
            f"refusing to listen on {host} without a bearer token: anyone who reaches the port could call "
            f"the server (read every row, or overwrite vectors). Give it a token with --token-file FILE "
            f"(or ${TOKEN_ENV}), listen on 127.0.0.1, or pass --insecure on a network you trust"
        )

    def describe(self) -> str:
        """A one-line summary for start-up messages, without the token."""
        transport = "mutual TLS" if self.mutual_tls else "TLS" if self.tls else "plaintext"
        return f"{transport}, {'bearer token required' if self.token else 'no token'}"

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials read from the PEM files; ``require_client_auth`` when mTLS.

        :raises ValueError: TLS is not configured.
        """
        if self.cert is None or self.key is None:
            raise ValueError("no TLS certificate configured")
        client_ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        """The interceptors a server needs: the token check when a token is set."""
        return [BearerTokenInterceptor(self.token)] if self.token else []

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, environ: Mapping[str, str] | None = None) -> ServerSecurity:
        """From the options :func:`add_cli_options` added; the token falls back to ``$EMBEDDING_GRPC_TOKEN``.

        :param args: parsed command-line options.
        :param environ: where to look for the token variable; ``os.environ`` by default.
        """
        env = os.environ if environ is None else environ
        token_file = getattr(args, "token_file", None)
        token = read_token_file(token_file) if token_file else (env.get(TOKEN_ENV) or None)
        return cls(
            cert=getattr(args, "tls_cert", None),
            key=getattr(args, "tls_key", None),
            client_ca=getattr(args, "tls_client_ca", None),
            token=token,
            insecure=bool(getattr(args, "insecure", False)),
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``; ``0.0.0.0``, ``[::]`` and names are not."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def write_token_file(path: str | Path) -> bool:
    """Create ``path`` with a new random token (256 bits, URL-safe), readable by its owner only,
    unless it exists: restarts keep the token that clients were given. ``True`` when created."""
    target = Path(path)
    if target.exists():
        read_token_file(target)  # an empty file is an error, not a token
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(secrets.token_urlsafe(32) + "\n")
    return True


def add_cli_options(parser: argparse.ArgumentParser) -> None:
    """``--tls-cert``, ``--tls-key``, ``--tls-client-ca`` and ``--token-file`` on a server command.

    :param parser: the sub-command's parser; read the result back with :meth:`ServerSecurity.from_args`.
    """
    group = parser.add_argument_group("transport security")
    group.add_argument("--tls-cert", type=Path, metavar="PEM", help="server certificate chain; enables TLS")
    group.add_argument("--tls-key", type=Path, metavar="PEM", help="private key of --tls-cert")
    group.add_argument(
        "--tls-client-ca", type=Path, metavar="PEM", help="require client certificates signed by this CA (mTLS)"
    )
    group.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help=f"require 'authorization: Bearer <token>' with the token in FILE (default: ${TOKEN_ENV} if set); "
        "a file keeps the token out of the process list",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening beyond 127.0.0.1 without a token (refused otherwise: anyone could call the server)",
    )


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` whose call ends at once with ``code``."""

    def abort(_request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, details)

    # Same arity and codecs as the real method, so streams end cleanly instead of with a protocol error.
    if handler.request_streaming and handler.response_streaming:
        factory: Callable[..., grpc.RpcMethodHandler] = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        factory = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        factory = grpc.unary_stream_rpc_method_handler
    else:
        factory = grpc.unary_unary_rpc_method_handler
    return factory(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <token>``; health checks always pass.

    :param token: the expected token, compared in constant time.
    """

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the bearer token is empty")
        self._expected = f"Bearer {token}".encode()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(token=***)"

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key.lower() == "authorization":
                presented = value if isinstance(value, bytes) else value.encode()
                if hmac.compare_digest(presented, self._expected):
                    return True
        return False

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = getattr(handler_call_details, "method", "") or ""
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        if self._authorized(getattr(handler_call_details, "invocation_metadata", None)):
            return handler
        return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
