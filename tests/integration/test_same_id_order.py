"""The DAG path keeps the later copy of an id a server sends in two chunks (race forced, see
:mod:`tests.integration.same_id_gate`).

Our AI server never splits copies of one id over two chunks (nor does a partition boundary or a
sub-batch cut), so on our own servers the DAG path only meets copies inside one sub-batch, where
the last occurrence wins. A third-party AI server may split them; this test is that server.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import psycopg
import pytest

from airflow_embedding_provider.grpc_server import add_health
from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
from airflow_embedding_provider.pipeline import ingest_chunks, prefetch
from airflow_embedding_provider.storage.schema import apply_schema
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes
from tests.integration.same_id_gate import DIM, NEWER, gate_held, install_gate, stored, two_chunks


class NaiveAiServer:
    """A third-party AI server: it streams fixed chunks as they come, copies of one id split over
    two chunks (ours keeps them in one chunk, so the DAG path needs another server to show this)."""

    def __init__(self, chunks: list[RowChunkBytes]) -> None:
        self._chunks = chunks
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        service = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingStreamService"].full_name
        handler = grpc.method_handlers_generic_handler(
            service,
            {
                "GetEmbeddings": grpc.unary_stream_rpc_method_handler(
                    self._get,
                    request_deserializer=embedding_pb2.StreamEmbeddingRequest.FromString,
                    response_serializer=RowChunkBytes.SerializeToString,
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        add_health(self.server, service)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _get(
        self, request: embedding_pb2.StreamEmbeddingRequest, context: grpc.ServicerContext
    ) -> Iterator[RowChunkBytes]:
        yield from self._chunks


@pytest.fixture
def naive_ai_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[NaiveAiServer]:
    _, chunks = two_chunks()
    server = NaiveAiServer(chunks)
    server.server.start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_EMBEDDING_GRPC_DEFAULT",
        f'{{"conn_type": "embedding_grpc", "host": "127.0.0.1", "port": {server.port}, "extra": {{"timeout": 10}}}}',
    )
    yield server
    server.server.stop(0)


def test_dag_path_keeps_the_later_copy_of_an_id_a_server_sends_in_two_chunks(
    naive_ai_server: NaiveAiServer, pg_dsn: str
) -> None:
    # What EmbeddingStreamToPgvectorOperator.execute composes: the hook's stream, the prefetch
    # thread, ingest_chunks over one writer a connection (two here, as in a mapped task).
    twice, _ = two_chunks()
    conns = [psycopg.connect(pg_dsn, autocommit=True) for _ in range(2)]
    try:
        apply_schema(conns[0], DIM)
        install_gate(pg_dsn)
        writers = [ChunkWriter(c, dimension=DIM) for c in conns]
        outcome: list[object] = []

        def run() -> None:
            with contextlib.closing(GrpcEmbeddingHook()) as hook:
                chunks = prefetch(hook.stream_chunks(after=None, chunk_size=5))
                outcome.append(ingest_chunks(chunks, writers, dimension=DIM, sub_batch_size=5))

        with gate_held(pg_dsn, twice) as seen:
            worker = threading.Thread(target=run)
            worker.start()
        worker.join(60)
        assert outcome, "the ingest did not finish"
    finally:
        for conn in conns:
            conn.close()
    assert stored(pg_dsn, twice) == (NEWER, 0.25), "the older copy overwrote the newer one"
    assert not seen["overtook"], "the newer copy was written before the older one had committed"
