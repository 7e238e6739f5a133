"""The AI server is killed with SIGKILL mid-stream and restarted: the hook reconnects and the
ingest resumes right after the last row it received; the tables end equal to the source."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
from airflow_embedding_provider.pipeline import ingest_chunks, prefetch
from airflow_embedding_provider.storage.checkpoint import read_checkpoint
from airflow_embedding_provider.storage.schema import apply_schema
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.wire.codec import WireChunk
from dev.stack import ServerProcess, free_port
from dev.verify import compare


def test_ai_server_sigkill_mid_stream_then_restart(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    pg_dsn: str,
    big_pkl: Path,
    big_dataset: EmbeddingDataset,
    tmp_path: Path,
) -> None:
    port = free_port()
    command = ["ai-server", "--pkl", str(big_pkl)]
    servers = [ServerProcess(command, port=port, log_path=tmp_path / "ai-1.log").start()]
    monkeypatch.setenv(
        "AIRFLOW_CONN_EMBEDDING_GRPC_DEFAULT",
        json.dumps({"conn_type": "embedding_grpc", "host": "127.0.0.1", "port": port, "extra": {"timeout": 60}}),
    )
    restarted = threading.Event()

    def restart() -> None:
        servers.append(ServerProcess(command, port=port, log_path=tmp_path / "ai-2.log").start())
        restarted.set()

    def kill_after(chunks: Iterator[WireChunk], count: int) -> Iterator[WireChunk]:
        for n, chunk in enumerate(chunks):
            if n == count:
                servers[0].stop(kill=True)  # SIGKILL: no goodbye on the wire
                threading.Thread(target=restart, daemon=True).start()
            yield chunk

    hook = GrpcEmbeddingHook()
    conns = [psycopg.connect(pg_dsn, autocommit=True) for _ in range(2)]
    try:
        apply_schema(conns[0], 384)
        writers = [ChunkWriter(c, dimension=384) for c in conns]
        stats = ingest_chunks(
            kill_after(prefetch(hook.stream_chunks(after=None, chunk_size=500)), 40),
            writers,
            dimension=384,
            sub_batch_size=250,
        )
        # The hook may reach the restarted server (and finish) before restart() has seen it healthy.
        assert restarted.wait(120)
        logged = capfd.readouterr()
        assert "broke (UNAVAILABLE" in logged.out + logged.err and "reconnect 1/5" in logged.out + logged.err
        # Rows the broken stream had already delivered are not sent twice.
        assert stats.rows_received == len(big_dataset) and stats.inserted == len(big_dataset)
        check = compare(conns[0], big_dataset)
        assert check.equal, check.summary()
        assert read_checkpoint(conns[0]) == big_dataset.ids[-1]
        assert "rows=" in (tmp_path / "ai-2.log").read_text()
    finally:
        hook.close()
        for conn in conns:
            conn.close()
        for server in servers:
            server.stop()
