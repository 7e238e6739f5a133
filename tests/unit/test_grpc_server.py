"""``grpc_server.py``: what every server of the package is built with: keepalive, binding, health,
call slots and the wait for a stop signal."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airflow_embedding_provider.grpc_server import (
    CallSlots,
    add_health,
    bind_port,
    keepalive_options,
    new_server,
)
from airflow_embedding_provider.wire.contract import KEEPALIVE_TIMEOUT_SECONDS


def test_keepalive_pings_quiet_peers_and_drops_dead_ones() -> None:
    options = dict(keepalive_options(12.5))
    assert options["grpc.keepalive_time_ms"] == 12_500
    assert (
        options["grpc.keepalive_timeout_ms"]
        == options["grpc.http2.ping_timeout_ms"]
        == KEEPALIVE_TIMEOUT_SECONDS * 1000
    )
    assert options["grpc.keepalive_permit_without_calls"] == 1


def test_a_bound_server_answers_health_for_itself_and_its_service() -> None:
    server = new_server(futures.ThreadPoolExecutor(2), options=[("grpc.keepalive_time_ms", 60_000)])
    add_health(server, "recruit.test.Service")
    port = bind_port(server, "127.0.0.1", 0)
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", "recruit.test.Service"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


class _AbortedError(Exception):
    pass


class _Context:
    """Stands in for a ``grpc.ServicerContext``: ``abort`` raises, as gRPC's does."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _AbortedError(details)


def test_call_slots_refuse_one_more_call_naming_the_limit() -> None:
    with pytest.raises(ValueError, match="--max-streams must be at least 1"):
        CallSlots(0, what="streams", option="--max-streams")
    slots = CallSlots(1, what="streams", option="--max-streams")
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with slots.hold(_Context()):
            held.set()
            release.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    assert held.wait(10) and slots.active == 1
    context = _Context()
    with pytest.raises(_AbortedError), slots.hold(context):
        pass
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 streams are in progress, the server's limit (--max-streams 1)" in context.aborted[1]
    release.set()
    worker.join(10)
    assert slots.active == 0


def test_bind_port_refuses_before_it_listens() -> None:
    from concurrent import futures

    server = new_server(futures.ThreadPoolExecutor(1))
    try:
        with pytest.raises(ValueError, match="without a bearer token"):
            bind_port(server, "0.0.0.0", 0)
    finally:
        server.stop(0)


# Blocks SIGTERM in the main thread so that the kernel must hand it to the other thread, as it may
# do in a server whose gRPC and writer threads leave signals unblocked.
_SIGNAL_ON_ANOTHER_THREAD = """
import os, signal, threading, time
from airflow_embedding_provider.grpc_server import wait_for_stop_signal

threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
wait_for_stop_signal()
print("stopped", flush=True)
"""


def test_a_stop_signal_delivered_to_another_thread_still_stops_the_server() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_ON_ANOTHER_THREAD], capture_output=True, text=True, timeout=30, check=False
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "stopped"), proc.stderr[-2000:]
