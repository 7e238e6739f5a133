"""Transport security shared by every gRPC server of the package: TLS, mutual TLS and a bearer token.

The bottom layer: it imports nothing from hooks, operators or servers, so each server (AI server,
API server, upload server) builds its ``grpc.Server`` through :func:`new_server` and binds it with
:func:`bind_port`. The client side lives in :mod:`airflow_embedding_provider.hooks.grpc_channel`.

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
import contextlib
import hmac
import ipaddress
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

#: Environment variable read for the token when no ``--token-file`` is given.
TOKEN_ENV = "EMBEDDING_GRPC_TOKEN"
#: Calls under this prefix (``Check``, ``Watch``) skip the token check so that probes work.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
#: Seconds between a server's HTTP/2 pings on a quiet connection, and how long it waits for the answer.
KEEPALIVE_SECONDS = 30.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0


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


def keepalive_options(keepalive: float = KEEPALIVE_SECONDS) -> list[tuple[str, int]]:
    """Channel arguments every server runs with: it pings a quiet peer every ``keepalive`` seconds
    and drops a connection whose ping goes unanswered for :data:`KEEPALIVE_TIMEOUT_SECONDS`, so a
    dead client (host gone, network cut, process frozen) does not hold a call for ever; and it
    accepts the clients' own keepalive pings (``hooks/grpc_channel.py`` sends one every 30 s)."""
    return [
        ("grpc.keepalive_time_ms", int(keepalive * 1000)),
        ("grpc.keepalive_timeout_ms", int(KEEPALIVE_TIMEOUT_SECONDS * 1000)),
        # grpcio 1.85 waits for the ping's answer this long, not keepalive_timeout (60 s by default).
        ("grpc.http2.ping_timeout_ms", int(KEEPALIVE_TIMEOUT_SECONDS * 1000)),
        # Keep pinging while a call sends nothing (an idle upload, a stalled reader) ...
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # ... and let clients ping as often as every 5 s without being told to go away.
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


def new_server(
    executor: futures.Executor,
    *,
    security: ServerSecurity | None = None,
    options: Sequence[tuple[str, Any]] | None = None,
    maximum_concurrent_rpcs: int | None = None,
    keepalive: float = KEEPALIVE_SECONDS,
) -> grpc.Server:
    """``grpc.server`` with the interceptors ``security`` asks for (none when it is ``None``) and
    :func:`keepalive_options`.

    :param executor: the thread pool that runs the handlers.
    :param security: TLS and token settings; ``None`` keeps a plain server.
    :param options: channel arguments passed to ``grpc.server``; they win over the keepalive ones.
    :param maximum_concurrent_rpcs: passed to ``grpc.server``; more calls are refused.
    :param keepalive: seconds between the server's pings on a quiet connection.
    """
    interceptors = security.interceptors() if security is not None else []
    merged = dict(keepalive_options(keepalive))
    merged.update(dict(options or ()))
    return grpc.server(
        executor,
        options=list(merged.items()),
        interceptors=interceptors or None,
        maximum_concurrent_rpcs=maximum_concurrent_rpcs,
    )


class CallSlots:
    """At most ``limit`` calls of one kind at once; one more ends at once with RESOURCE_EXHAUSTED
    and a message that names the limit and its option, instead of waiting for a thread.

    :param limit: calls served at once.
    :param what: the calls' name in the refusal, e.g. ``"streams"``.
    :param option: the option that sets ``limit``, named in the refusal.
    """

    def __init__(self, limit: int, *, what: str, option: str) -> None:
        if limit < 1:
            raise ValueError(f"{option} must be at least 1, got {limit}")
        self.limit = limit
        self._what = what
        self._option = option
        self._slots = threading.BoundedSemaphore(limit)
        self._lock = threading.Lock()
        self._active = 0

    @property
    def active(self) -> int:
        with self._lock:
            return self._active

    @contextlib.contextmanager
    def hold(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Hold a slot for the body; abort the call with RESOURCE_EXHAUSTED when none is free."""
        if not self._slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.limit} {self._what} are in progress, the server's limit ({self._option} {self.limit}); "
                "retry later",
            )
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
            self._slots.release()


def bind_port(server: grpc.Server, host: str, port: int, security: ServerSecurity | None = None) -> int:
    """Listen on ``host:port`` (0 = a free port), TLS when ``security`` has a certificate; returns the port.

    :raises ValueError: ``host`` is beyond loopback and there is no token (see
        :meth:`ServerSecurity.check_exposure`).
    :raises OSError: the address cannot be bound.
    """
    (security or ServerSecurity()).check_exposure(host)
    address = f"{host}:{port}"
    if security is not None and security.tls:
        bound = server.add_secure_port(address, security.credentials())
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    return bound


def add_health(server: grpc.Server, service_name: str) -> health.HealthServicer:
    """gRPC health checking on ``server``, SERVING for the server ("") and ``service_name``.

    Health checks pass the token check (see :class:`BearerTokenInterceptor`), so probes need none.
    """
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", service_name):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def wait_for_stop_signal(ready: threading.Event | None = None) -> None:
    """Block until SIGTERM or SIGINT arrives (call it from the main thread, which owns signals).

    :param ready: set once the handlers are installed, for callers serving in a thread of a test.
    """
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    # Python runs signal handlers only in the main thread, when it executes bytecode. The kernel
    # may hand a process's signal to any thread (a gRPC or writer thread), and then an untimed
    # wait() never wakes to run the handler: a SIGTERM was once ignored for 120 s in CI.
    while not stop.wait(timeout=0.5):
        pass
