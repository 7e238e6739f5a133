"""Helpers of the upload server tests: the server as a real process, an in-process client whose
request stream the test controls, and table reads."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psycopg
import pytest

from airflow_embedding_provider.upload_server.service import UPLOAD_ID_KEY, UPLOAD_METHOD
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes
from dev.stack import ServerProcess

StartServer = Callable[..., ServerProcess]


@pytest.fixture
def upload_server(pg_dsn: str, tmp_path: Path) -> Iterator[StartServer]:
    """Starts ``airflow-embedding upload-server`` on a free port over this test's database; extra
    CLI arguments as parameters. Every server started is stopped at the end."""
    started: list[ServerProcess] = []

    def start(*extra: str) -> ServerProcess:
        log_path = tmp_path / f"upload-server-{len(started)}.log"
        server = ServerProcess(["upload-server", "--postgres-dsn", pg_dsn, *extra], log_path=log_path)
        started.append(server)
        return server.start(timeout=180)

    yield start
    for server in started:
        server.stop()


def server_log(server: ServerProcess) -> str:
    assert server.log_path is not None
    return server.log_path.read_text(encoding="utf-8", errors="replace")


def wait_for_log(server: ServerProcess, pattern: str, timeout: float = 120) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, server_log(server))
        if match:
            return match
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matching {pattern!r}:\n{server_log(server)[-3000:]}")
        time.sleep(0.2)


def count_rows(dsn: str, table: str = "recruit_metadata") -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()  # test-owned table names
    assert row is not None
    return int(row[0])


def wait_for_rows(dsn: str, rows: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while count_rows(dsn) < rows:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count_rows(dsn)} rows stored after {timeout:g} s, expected {rows}")
        time.sleep(0.1)


class GatedUpload:
    """An upload whose request stream sends ``before_gate`` chunks, then waits until the test opens
    the gate (or cancels the call) before sending the rest."""

    def __init__(self, target: str, chunks: list[RowChunkBytes], before_gate: int, upload_id: str) -> None:
        self.gate = threading.Event()
        self.sent = 0
        self._gated = threading.Event()
        self._cancelled = threading.Event()
        self._channel = grpc.insecure_channel(target)
        call = self._channel.stream_unary(
            UPLOAD_METHOD,
            request_serializer=RowChunkBytes.SerializeToString,
            response_deserializer=embedding_pb2.UploadResult.FromString,
        )
        self._chunks, self._before_gate = chunks, before_gate
        self.future = call.future(self._requests(), metadata=[(UPLOAD_ID_KEY, upload_id)], timeout=300)

    def _requests(self) -> Iterator[RowChunkBytes]:
        for i, chunk in enumerate(self._chunks):
            if i == self._before_gate:
                self._gated.set()
                while not self.gate.wait(0.1):
                    if self._cancelled.is_set():
                        return
            yield chunk
            self.sent += 1

    def wait_gated(self, timeout: float = 120) -> None:
        assert self._gated.wait(timeout), "the upload never reached its gate"

    def cancel(self) -> None:
        self._cancelled.set()
        self.future.cancel()

    def result(self, timeout: float = 300) -> embedding_pb2.UploadResult:
        return self.future.result(timeout=timeout)

    def close(self) -> None:
        self._cancelled.set()
        self._channel.close()
