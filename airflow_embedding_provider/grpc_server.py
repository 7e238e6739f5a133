"""Server plumbing every gRPC server of the package shares: build, bind, health, keepalive, call
slots and the wait for a stop signal.

Each server (AI server, upload server, the dev tools' reference API server) builds its
``grpc.Server`` through :func:`new_server` and binds it with :func:`bind_port`, with the transport
security of :mod:`airflow_embedding_provider.security`.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from airflow_embedding_provider.security import ServerSecurity
from airflow_embedding_provider.wire.contract import KEEPALIVE_SECONDS, KEEPALIVE_TIMEOUT_SECONDS


def keepalive_options(keepalive: float = KEEPALIVE_SECONDS) -> list[tuple[str, int]]:
    """Channel arguments every server runs with: it pings a quiet peer every ``keepalive`` seconds
    and drops a connection whose ping goes unanswered for :data:`KEEPALIVE_TIMEOUT_SECONDS`, so a
    dead client (host gone, network cut, process frozen) does not hold a call for ever; and it
    accepts the clients' own keepalive pings (``hooks/grpc_channel.py`` sends them as often)."""
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
