"""``wire/contract.py``: the names and limits both ends of the wire share, checked against the code
that serves them."""

from __future__ import annotations

from pathlib import Path

from airflow_embedding_provider.get_provider_info import get_provider_info
from airflow_embedding_provider.hooks.grpc_cache import GrpcCacheHook
from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
from airflow_embedding_provider.wire import embedding_pb2_grpc
from airflow_embedding_provider.wire.contract import (
    AI_SERVER_PORT,
    API_SERVER_PORT,
    CACHE_SERVICE,
    EMBEDDING_SERVICE,
    GRPC_DEFAULT_MESSAGE_BYTES,
    MAX_CHUNK_BYTES,
    MAX_RECEIVE_MESSAGE_BYTES,
    UPLOAD_SERVER_PORT,
)


def test_service_names_are_the_generated_stubs() -> None:
    assert EMBEDDING_SERVICE == "recruit.embedding.v1.EmbeddingStreamService"
    assert CACHE_SERVICE == "recruit.embedding.v1.CacheService"
    # The generated servicer registration names the same services.
    source = Path(embedding_pb2_grpc.__file__).read_text(encoding="utf-8")
    assert f"'{EMBEDDING_SERVICE}'" in source and f"'{CACHE_SERVICE}'" in source


def test_the_ports_differ_and_the_hooks_and_provider_info_use_them() -> None:
    assert len({AI_SERVER_PORT, API_SERVER_PORT, UPLOAD_SERVER_PORT}) == 3
    assert GrpcEmbeddingHook.default_port == AI_SERVER_PORT
    assert GrpcCacheHook.default_port == API_SERVER_PORT
    types = {c["connection-type"]: c for c in get_provider_info()["connection-types"]}
    assert set(types) == {GrpcEmbeddingHook.conn_type, GrpcCacheHook.conn_type}


def test_a_sent_chunk_fits_every_receiver() -> None:
    assert MAX_CHUNK_BYTES < GRPC_DEFAULT_MESSAGE_BYTES < MAX_RECEIVE_MESSAGE_BYTES
