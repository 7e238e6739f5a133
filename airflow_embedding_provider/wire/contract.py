"""What both ends of the wire agree on: service names, default ports, chunk size, message sizes.

Every server, hook and command takes these from here, so that a port or a limit changes in one
place. The service names come from the generated descriptor, so they follow ``proto/``.
"""

from __future__ import annotations

from airflow_embedding_provider.digest import HASH_BYTES
from airflow_embedding_provider.wire import embedding_pb2

#: ``recruit.embedding.v1.EmbeddingStreamService``: the AI server's pull and the upload server's push.
EMBEDDING_SERVICE: str = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingStreamService"].full_name
#: ``recruit.embedding.v1.CacheService``: the API server's cache invalidation.
CACHE_SERVICE: str = embedding_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name

#: The AI server (``GetEmbeddings``, ``PlanPartitions``).
AI_SERVER_PORT = 50051
#: The API server (``CacheService``).
API_SERVER_PORT = 50052
#: The upload server (``UploadEmbeddings``).
UPLOAD_SERVER_PORT = 50053

#: Seconds between HTTP/2 pings on a quiet connection, both ways, and how long a ping's answer may
#: take before the peer counts as gone: a dead host or a cut network ends a call within about 40 s.
KEEPALIVE_SECONDS = 30.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0
#: Seconds a unary call (and the wait for a channel to be ready) may take when the connection
#: names no ``timeout``.
DEFAULT_CALL_TIMEOUT = 30.0

#: Rows a ``RowChunk`` message when the request names none (``StreamEmbeddingRequest.chunk_size``,
#: docs/design.md §7.1).
DEFAULT_CHUNK_SIZE = 300

#: gRPC's default limit on a message, which any peer with default settings enforces.
GRPC_DEFAULT_MESSAGE_BYTES = 4 * 1024 * 1024
#: The largest ``RowChunk`` a sender builds: gRPC refuses messages over 4 MiB by default; stay well
#: under it whatever the dimension and whatever a row's cells hold.
MAX_CHUNK_BYTES = 3 * 1024 * 1024
#: What the package's receivers accept: room for the largest chunk a sender builds, plus headroom.
MAX_RECEIVE_MESSAGE_BYTES = 16 * 1024 * 1024


def max_chunk_size(dimension: int) -> int:
    """The largest chunk whose message stays under :data:`MAX_CHUNK_BYTES` (1 KiB of text a row,
    and its hash): the most rows a sender puts in a message, and so the largest ``chunk_size`` a
    stream takes."""
    return max(1, MAX_CHUNK_BYTES // (4 * dimension + 1024 + HASH_BYTES))
