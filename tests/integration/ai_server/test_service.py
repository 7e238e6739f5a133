"""The AI server over real gRPC on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.ai_server.service import DEFAULT_MAX_STREAMS, SERVICE_NAME
from airflow_embedding_provider.partitions import DEFAULT_MAX_PARTITIONS
from airflow_embedding_provider.wire import embedding_pb2, embedding_pb2_grpc
from airflow_embedding_provider.wire.contract import max_chunk_size
from dev.stack import ServerProcess

SEED_CLIENT = Path(__file__).resolve().parents[1] / "seed_client.py"


def _stream(target: str, after: str = "", chunk_size: int = 0) -> list[embedding_pb2.RowChunk]:
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 16 << 20)]) as channel:
        stub = embedding_pb2_grpc.EmbeddingStreamServiceStub(channel)
        return list(
            stub.GetEmbeddings(embedding_pb2.StreamEmbeddingRequest(last_processed_uuid=after, chunk_size=chunk_size))
        )


def test_streams_every_row_in_id_order_in_chunks(ai_server: str, sample_dataset: EmbeddingDataset) -> None:
    chunks = _stream(ai_server, chunk_size=250)
    assert [len(c.rows) for c in chunks] == [250] * 12
    ids = [r.id for c in chunks for r in c.rows]
    assert ids == sample_dataset.ids == sorted(ids)


def test_default_chunk_size_is_300(ai_server: str) -> None:
    assert len(_stream(ai_server)[0].rows) == 300


def test_resumes_strictly_after_the_given_id(ai_server: str, sample_dataset: EmbeddingDataset) -> None:
    after = sample_dataset.ids[1234]
    ids = [r.id for c in _stream(ai_server, after=after, chunk_size=500) for r in c.rows]
    assert ids == sample_dataset.ids[1235:]
    assert _stream(ai_server, after=sample_dataset.ids[-1]) == []


@pytest.mark.parametrize(
    ("after", "chunk", "message"),
    [
        ("", 10**6, "chunk_size 1000000 is out of range"),
        ("", -5, "chunk_size -5 is out of range"),
        ("not-a-uuid", 10, "last_processed_uuid 'not-a-uuid' is not a UUID"),
    ],
)
def test_bad_requests_are_invalid_argument(ai_server: str, after: str, chunk: int, message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _stream(ai_server, after=after, chunk_size=chunk)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_largest_chunk_stays_under_the_default_4_mib_limit(ai_server: str, sample_dataset: EmbeddingDataset) -> None:
    biggest = max_chunk_size(sample_dataset.dimension)
    with grpc.insecure_channel(ai_server) as channel:  # default limits, as any client has them
        stub = embedding_pb2_grpc.EmbeddingStreamServiceStub(channel)
        first = next(iter(stub.GetEmbeddings(embedding_pb2.StreamEmbeddingRequest(chunk_size=biggest))))
    assert len(first.rows) == biggest and first.ByteSize() < 4 * 1024 * 1024


def test_a_plan_request_that_leaves_its_sizes_unset_gets_the_ingest_dags_defaults(ai_server: str) -> None:
    with grpc.insecure_channel(ai_server) as channel:
        stub = embedding_pb2_grpc.EmbeddingStreamServiceStub(channel)
        capped = stub.PlanPartitions(embedding_pb2.PartitionPlanRequest(rows_per_partition=1), timeout=5)
        whole = stub.PlanPartitions(embedding_pb2.PartitionPlanRequest(), timeout=5)
    # 3,000 rows at one a partition: the cap decides, and it is the DAG's (and the server's streams').
    assert len(capped.partitions) == DEFAULT_MAX_PARTITIONS == DEFAULT_MAX_STREAMS
    assert [p.rows for p in whole.partitions] == [3000]


def test_health_reports_serving(ai_server: str) -> None:
    with grpc.insecure_channel(ai_server) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_of_the_seed_proto_reads_the_same_floats(ai_server: str, sample_dataset: EmbeddingDataset) -> None:
    result = subprocess.run(
        [sys.executable, str(SEED_CLIENT), "get", ai_server, "", "700"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in rows] == sample_dataset.ids
    for i in (0, 1, 699, 700, len(rows) - 1):
        assert bytes.fromhex(rows[i]["vector"]) == sample_dataset.vectors[i].astype("<f4").tobytes()
        assert rows[i]["company_name"] == sample_dataset.company_name[i]
        assert rows[i]["exp_years"] == sample_dataset.exp_years[i]
    all_vectors = np.frombuffer(b"".join(bytes.fromhex(r["vector"]) for r in rows), dtype="<f4")
    assert all_vectors.tobytes() == sample_dataset.vectors.astype("<f4").tobytes()


def test_sigterm_stops_the_server_cleanly(sample_pkl: Path, tmp_path: Path) -> None:
    log = tmp_path / "ai.log"
    server = ServerProcess(["ai-server", "--pkl", str(sample_pkl)], log_path=log).start()
    assert server.proc is not None
    began = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - began < 15
    assert "shutting down" in log.read_text()


def test_logs_rows_and_rate_per_stream(sample_pkl: Path, tmp_path: Path) -> None:
    log = tmp_path / "ai.log"
    with ServerProcess(["ai-server", "--pkl", str(sample_pkl)], log_path=log) as server:
        _stream(server.target, chunk_size=1000)
    text = log.read_text()
    assert "GetEmbeddings" in text and "rows=3000" in text and "rows/s=" in text
