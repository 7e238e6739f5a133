"""Slow readers cannot starve the AI server: real streams on 127.0.0.1 that read one chunk and
then stop reading (bounded: each holds for at most a minute and is cancelled at the end)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.ai_server.service import SERVICE_NAME, build_server
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes

#: A reader's receive window stays small without BDP probing: the server's send blocks after two chunks.
SLOW_READER_OPTIONS = [("grpc.http2.bdp_probe", 0)]


class SlowReader:
    """A ``GetEmbeddings`` stream on its own connection that reads one chunk, then nothing."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target, options=SLOW_READER_OPTIONS)
        call = self.channel.unary_stream(
            f"/{SERVICE_NAME}/GetEmbeddings",
            request_serializer=embedding_pb2.StreamEmbeddingRequest.SerializeToString,
            response_deserializer=RowChunkBytes.FromString,
        )
        self.stream = call(embedding_pb2.StreamEmbeddingRequest(chunk_size=50), timeout=30)

    def read_one(self, within: float = 5.0) -> int:
        """Rows of the next chunk; fails when none arrives ``within`` seconds (a starved server)."""
        with futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(next, self.stream)
            try:
                return len(pending.result(timeout=within).rows)
            except futures.TimeoutError:
                self.stream.cancel()
                pytest.fail(f"no chunk within {within:g} s: the server has no thread for this stream")

    def close(self) -> None:
        self.stream.cancel()
        self.channel.close()


@pytest.fixture
def readers() -> Iterator[list[SlowReader]]:
    opened: list[SlowReader] = []
    yield opened
    for reader in opened:
        reader.close()


def answers(target: str) -> tuple[str, int]:
    """Health status and the plan's partition count, each asked with a 3 s deadline."""
    with grpc.insecure_channel(target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=3
        )
        plan_call = channel.unary_unary(
            f"/{SERVICE_NAME}/PlanPartitions",
            request_serializer=embedding_pb2.PartitionPlanRequest.SerializeToString,
            response_deserializer=embedding_pb2.PartitionPlan.FromString,
        )
        plan = plan_call(embedding_pb2.PartitionPlanRequest(rows_per_partition=1000, max_partitions=8), timeout=3)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status.status), len(plan.partitions)


def stalled(target: str, readers: list[SlowReader], count: int) -> None:
    for _ in range(count):
        reader = SlowReader(target)
        readers.append(reader)
        assert reader.read_one() == 50
    time.sleep(1)  # the server has filled every reader's window and waits in its send


def test_sixteen_slow_readers_leave_health_and_planning_answerable(
    sample_dataset: EmbeddingDataset, readers: list[SlowReader]
) -> None:
    # The defaults: a mapped run streams up to max_partitions ranges at once.
    server, port = build_server(sample_dataset, host="127.0.0.1", port=0)
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        stalled(target, readers, 16)
        assert answers(target) == ("SERVING", 3)
        # ... and one more stream still gets its rows.
        extra = SlowReader(target)
        readers.append(extra)
        assert extra.read_one() == 50
    finally:
        server.stop(0)


def test_streams_beyond_the_cap_are_refused_clearly_while_health_and_planning_answer(
    sample_dataset: EmbeddingDataset, readers: list[SlowReader]
) -> None:
    server, port = build_server(sample_dataset, host="127.0.0.1", port=0, max_streams=3)
    server.start()
    try:
        target = f"127.0.0.1:{port}"
        stalled(target, readers, 3)
        refused = SlowReader(target)
        readers.append(refused)
        with pytest.raises(grpc.RpcError) as info:
            refused.read_one()
        error = info.value
        assert isinstance(error, grpc.Call)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.details() == "3 streams are in progress, the server's limit (--max-streams 3); retry later"
        assert answers(target) == ("SERVING", 3)
        # A slot frees when a reader goes away.
        readers.pop(0).close()
        deadline = time.monotonic() + 10
        while True:
            again = SlowReader(target)
            readers.append(again)
            try:
                assert again.read_one() == 50
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the slot of a cancelled stream never came back"
                time.sleep(0.2)
    finally:
        server.stop(0)
