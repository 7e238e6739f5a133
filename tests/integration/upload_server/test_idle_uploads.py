"""Uploads that open and go quiet, or whose client freezes, give their slot back: real idle
clients, a real frozen client process (SIGSTOP), a real server process over a real PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grpc
import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.upload_server.client import UploadError, dataset_chunks, upload
from airflow_embedding_provider.wire import embedding_pb2
from tests.integration.upload_server.conftest import GatedUpload, StartServer, server_log, wait_for_log


def server_connections(dsn: str) -> int:
    """Sessions on the test's database other than the one asking."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def upload_when_a_slot_frees(target: str, chunks: list, deadline_s: float) -> embedding_pb2.UploadResult:
    """Upload, retrying RESOURCE_EXHAUSTED refusals for up to ``deadline_s`` seconds."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return upload(target, iter(chunks), timeout=120)
        except UploadError as exc:
            if "RESOURCE_EXHAUSTED" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_idle_uploads_time_out_and_another_upload_gets_through(
    upload_server: StartServer, pg_dsn: str, sample_dataset: EmbeddingDataset
) -> None:
    server = upload_server("--max-concurrent-uploads", "2", "--idle-timeout", "3")
    chunks = list(dataset_chunks(sample_dataset, 300))
    # Two clients open an upload each and never send a message: every slot of the server taken.
    idle = [GatedUpload(server.target, chunks, before_gate=0, upload_id=f"idle-{i}") for i in range(2)]
    try:
        for client in idle:
            client.wait_gated()
        wait_for_log(server, r"upload idle-1 from .*: started")
        with pytest.raises(UploadError, match=r"RESOURCE_EXHAUSTED.*--max-concurrent-uploads 2"):
            upload(server.target, iter(chunks[:1]), timeout=30)
        # Waiting for its first message, an upload holds no database connection.
        assert server_connections(pg_dsn) == 0
        result = upload_when_a_slot_frees(server.target, chunks, deadline_s=60)
        assert result.success, result.message
        assert "3000 rows in 10 chunks" in result.message
        for client in idle:
            with pytest.raises(grpc.RpcError) as info:
                client.result(timeout=30)
            error = info.value
            assert isinstance(error, grpc.Call)
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no message for 3 s (the server's --idle-timeout); the 0 rows received are committed" in str(
                error.details()
            )
            assert client.sent == 0  # they never sent anything and never closed their channels
    finally:
        for client in idle:
            client.close()
    log = server_log(server)
    assert "upload idle-0 from" in log and "no message for 3 s after 0 rows in 0 chunks" in log


FROZEN_CLIENT = textwrap.dedent(
    """
    import sys, threading
    import grpc
    from airflow_embedding_provider.ai_server.dataset import load_dataset
    from airflow_embedding_provider.upload_server.client import dataset_chunks
    from airflow_embedding_provider.upload_server.service import UPLOAD_ID_KEY, UPLOAD_METHOD
    from airflow_embedding_provider.wire import embedding_pb2
    from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes

    chunks = list(dataset_chunks(load_dataset(sys.argv[2]), 300))
    channel = grpc.insecure_channel(sys.argv[1])
    call = channel.stream_unary(UPLOAD_METHOD, request_serializer=RowChunkBytes.SerializeToString,
                                response_deserializer=embedding_pb2.UploadResult.FromString)
    sent_one = threading.Event()

    def requests():
        yield chunks[0]
        sent_one.set()
        threading.Event().wait(600)  # then nothing more (the test freezes this process)

    future = call.future(requests(), metadata=[(UPLOAD_ID_KEY, "frozen")], timeout=600)
    sent_one.wait(60)
    print("sent", flush=True)
    threading.Event().wait(600)
    """
)


def test_a_frozen_client_is_dropped_by_keepalive_and_its_slot_freed(
    upload_server: StartServer, pg_dsn: str, sample_dataset: EmbeddingDataset, sample_pkl: Path
) -> None:
    # The idle timeout is out of the way (600 s): only the server's keepalive can free the slot.
    server = upload_server("--max-concurrent-uploads", "1", "--idle-timeout", "600", "--keepalive", "1")
    client = subprocess.Popen(
        [sys.executable, "-c", FROZEN_CLIENT, server.target, str(sample_pkl)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert client.stdout is not None and client.stdout.readline().strip() == "sent"
        wait_for_log(server, r"upload frozen from .*: started")
        os.kill(client.pid, signal.SIGSTOP)  # alive to the kernel (TCP is acknowledged), deaf to HTTP/2 pings
        chunks = list(dataset_chunks(sample_dataset, 300))
        with pytest.raises(UploadError, match="RESOURCE_EXHAUSTED"):
            upload(server.target, iter(chunks[:1]), timeout=30)
        began = time.monotonic()
        result = upload_when_a_slot_frees(server.target, chunks, deadline_s=60)
        assert result.success, result.message
        # Pinged after 1 s of quiet, unanswered for the 10 s timeout: dropped well within a minute.
        assert time.monotonic() - began < 45
        wait_for_log(server, r"upload frozen from .*: aborted by the client after 300 rows in 1 chunks")
    finally:
        os.kill(client.pid, signal.SIGKILL)
        client.wait(30)
