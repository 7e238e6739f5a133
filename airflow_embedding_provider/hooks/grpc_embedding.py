"""``GrpcEmbeddingHook``: talks to the AI server's ``EmbeddingStreamService``."""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import Any

import grpc
from airflow.sdk import BaseHook
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airflow_embedding_provider.hooks.grpc_channel import ChannelSettings
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.codec import WireChunk, decode_chunk
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes

EMBEDDING_SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingStreamService"].full_name
DEFAULT_PORT = 50051


class GrpcEmbeddingHook(BaseHook):
    """Streams rows from the AI server.

    :param grpc_conn_id: an ``embedding_grpc`` connection: host, port and the extras ``use_tls``,
        ``ca_cert``, ``client_cert``, ``client_key``, ``token`` and ``timeout`` (seconds).
    """

    conn_name_attr = "grpc_conn_id"
    default_conn_name = "embedding_grpc_default"
    conn_type = "embedding_grpc"
    hook_name = "Embedding gRPC"

    def __init__(self, grpc_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.grpc_conn_id = grpc_conn_id

    @cached_property
    def settings(self) -> ChannelSettings:
        return ChannelSettings.from_connection(self.get_connection(self.grpc_conn_id), default_port=DEFAULT_PORT)

    @cached_property
    def channel(self) -> grpc.Channel:
        return self.settings.open_channel()

    def get_conn(self) -> grpc.Channel:
        return self.channel

    def close(self) -> None:
        if "channel" in self.__dict__:
            self.__dict__.pop("channel").close()

    def stream_chunks(self, *, after: str | None, chunk_size: int, timeout: float | None = None) -> Iterator[WireChunk]:
        """``GetEmbeddings``: decoded chunks of the rows strictly after ``after`` (``None`` = all).

        :param timeout: a deadline for the whole stream, in seconds; none by default, since a large
            load may stream for long. A dead peer is still noticed through keepalive.
        """
        call = self.channel.unary_stream(
            f"/{EMBEDDING_SERVICE}/GetEmbeddings",
            request_serializer=embedding_pb2.StreamEmbeddingRequest.SerializeToString,
            response_deserializer=RowChunkBytes.FromString,
        )
        request = embedding_pb2.StreamEmbeddingRequest(last_processed_uuid=after or "", chunk_size=chunk_size)
        self.wait_until_ready()
        responses = call(request, timeout=timeout, metadata=self.settings.metadata())
        try:
            for message in responses:
                yield decode_chunk(message)
        finally:
            responses.cancel()

    def wait_until_ready(self) -> None:
        """Block until the channel connects; ``ConnectionError`` after the connection's timeout."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=self.settings.timeout)
        except grpc.FutureTimeoutError:
            raise ConnectionError(
                f"no gRPC server answered at {self.settings.target} within "
                f"{self.settings.timeout:g} s (connection {self.grpc_conn_id!r})"
            ) from None

    def health(self, service: str = EMBEDDING_SERVICE) -> str:
        """The server's health status name for ``service`` (``SERVING`` when healthy)."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=self.settings.timeout,
            metadata=self.settings.metadata(),
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def test_connection(self) -> tuple[bool, str]:
        """Used by the connection form's Test button: asks the server's health service."""
        try:
            status = self.health()
        except grpc.RpcError as exc:
            return False, f"{self.settings.target}: {exc.code().name}: {exc.details()}"
        except (ValueError, OSError) as exc:
            return False, str(exc)
        finally:
            self.close()
        return status == "SERVING", f"{self.settings.target}: {status}"
