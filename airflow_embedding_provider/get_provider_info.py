"""Provider metadata read by Airflow's providers manager (entry point ``apache_airflow_provider``)."""

from __future__ import annotations

from typing import Any

from airflow_embedding_provider import __version__
from airflow_embedding_provider.wire.contract import AI_SERVER_PORT, API_SERVER_PORT, DEFAULT_CALL_TIMEOUT

# Names, not imports of the hooks: Airflow's providers manager calls this while the hooks' own
# imports (airflow.sdk) are still loading it. A unit test keeps them equal to the hooks'.
#: connection type -> (hook class, hook name, default port)
_CONNECTION_TYPES: dict[str, tuple[str, str, int]] = {
    "embedding_grpc": (
        "airflow_embedding_provider.hooks.grpc_embedding.GrpcEmbeddingHook",
        "Embedding gRPC",
        AI_SERVER_PORT,
    ),
    "embedding_cache_grpc": (
        "airflow_embedding_provider.hooks.grpc_cache.GrpcCacheHook",
        "Embedding cache invalidation gRPC",
        API_SERVER_PORT,
    ),
}

_GRPC_FIELDS: dict[str, Any] = {
    "use_tls": {"label": "Use TLS", "schema": {"type": ["boolean", "null"], "default": False}},
    "ca_cert": {
        "label": "CA certificate path",
        "description": "PEM file that verifies the server (TLS)",
        "schema": {"type": ["string", "null"]},
    },
    "client_cert": {
        "label": "Client certificate path",
        "description": "PEM file for mutual TLS",
        "schema": {"type": ["string", "null"]},
    },
    "client_key": {
        "label": "Client key path",
        "description": "PEM private key for mutual TLS",
        "schema": {"type": ["string", "null"]},
    },
    "tls_server_name": {
        "label": "TLS server name",
        "description": "Name to check the server certificate against instead of the host",
        "schema": {"type": ["string", "null"]},
    },
    "token": {
        "label": "Auth token",
        "description": "Sent as 'authorization: Bearer <token>'",
        "schema": {"type": ["string", "null"], "format": "password"},
    },
    "token_file": {
        "label": "Auth token file",
        "description": "A file holding the token (when no token is set), e.g. one a deployment generated",
        "schema": {"type": ["string", "null"]},
    },
    "timeout": {
        "label": "Timeout (s)",
        "description": "Deadline for unary calls and for connecting",
        "schema": {"type": ["number", "null"], "default": DEFAULT_CALL_TIMEOUT, "minimum": 0},
    },
}


def _grpc_behaviour(port: int) -> dict[str, Any]:
    """The form of a gRPC connection type; ``port`` is its server's default port."""
    return {
        "hidden-fields": ["schema", "login", "password"],
        "relabeling": {"host": "gRPC host"},
        "placeholders": {"host": "127.0.0.1", "port": str(port), "timeout": f"{DEFAULT_CALL_TIMEOUT:g}"},
    }


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-embedding-provider",
        "name": "Embedding Stream",
        "description": "Streams embeddings from a Python AI server over gRPC into PostgreSQL/pgvector, "
        "with a dead letter queue, checkpoints and cache invalidation.",
        "versions": [__version__],
        "integrations": [
            {"integration-name": "Embedding gRPC", "tags": ["software"]},
            {"integration-name": "Embedding pgvector search", "tags": ["software"]},
        ],
        "hooks": [
            {
                "integration-name": "Embedding gRPC",
                "python-modules": [
                    "airflow_embedding_provider.hooks.grpc_embedding",
                    "airflow_embedding_provider.hooks.grpc_cache",
                ],
            },
            {
                "integration-name": "Embedding pgvector search",
                "python-modules": ["airflow_embedding_provider.hooks.postgres"],
            },
        ],
        "operators": [
            {
                "integration-name": "Embedding gRPC",
                "python-modules": [
                    "airflow_embedding_provider.operators.embedding_stream",
                    "airflow_embedding_provider.operators.dlq_replay",
                    "airflow_embedding_provider.operators.cache_invalidate",
                ],
            }
        ],
        # One type per server, so that Test asks each server about the service it must serve.
        "connection-types": [
            {
                "connection-type": conn_type,
                "hook-class-name": hook_class,
                "hook-name": hook_name,
                "conn-fields": _GRPC_FIELDS,
                "ui-field-behaviour": _grpc_behaviour(port),
            }
            for conn_type, (hook_class, hook_name, port) in _CONNECTION_TYPES.items()
        ],
    }
