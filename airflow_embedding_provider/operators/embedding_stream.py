"""``EmbeddingStreamToPgvectorOperator``: AI server stream -> PostgreSQL/pgvector."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import psycopg
from airflow.providers.postgres.hooks.postgres import PostgresHook
from airflow.sdk import BaseOperator

from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
from airflow_embedding_provider.pipeline import ingest_chunks, prefetch
from airflow_embedding_provider.rows import DEFAULT_DIMENSION, canonical_uuid
from airflow_embedding_provider.storage.schema import TableNames, apply_schema, ensure_ann_index
from airflow_embedding_provider.storage.writer import DEFAULT_STREAM, ChunkWriter, read_checkpoint

if TYPE_CHECKING:
    from airflow.sdk import Context

DEFAULT_CHUNK_SIZE = 300


def psycopg3_connection(hook: PostgresHook) -> psycopg.Connection:
    """The hook's connection, which must be psycopg 3 (COPY BINARY and pgvector's adapter need it)."""
    conn = hook.get_conn()
    if not isinstance(conn, psycopg.Connection):
        conn.close()
        raise RuntimeError(
            "the Postgres provider returned a psycopg2 connection; this provider needs psycopg 3: "
            "install psycopg[binary]>=3.2 with SQLAlchemy 2 (the postgres provider then uses psycopg 3)"
        )
    return conn


class EmbeddingStreamToPgvectorOperator(BaseOperator):
    """Streams rows from the AI server (``GetEmbeddings``) and upserts them chunk by chunk.

    Each chunk is validated, split into ``recruit_metadata`` and ``recruit_embedding`` rows and
    written metadata first, with its rejected rows going to ``recruit_embedding_dlq`` and the
    checkpoint advancing in the same transaction. Returns the counts and the final checkpoint; the
    checkpoint is also pushed as XCom key ``checkpoint``.

    :param grpc_conn_id: ``embedding_grpc`` connection of the AI server.
    :param postgres_conn_id: PostgreSQL connection (pgvector installed or installable).
    :param last_processed_uuid: resume strictly after this id; empty or ``None`` = resume after the
        stored checkpoint (or from the first row when there is none). Templated.
    :param chunk_size: rows a gRPC message (the server caps it below 4 MiB messages). Templated.
    :param dimension: the vector dimension the tables are declared with.
    :param stream_name: which checkpoint row this ingest advances.
    :param build_ann_index: build the ivfflat index after the load when it does not exist yet.
    """

    template_fields: Sequence[str] = ("grpc_conn_id", "postgres_conn_id", "last_processed_uuid", "chunk_size")
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        grpc_conn_id: str = GrpcEmbeddingHook.default_conn_name,
        postgres_conn_id: str = "postgres_default",
        last_processed_uuid: str | None = None,
        chunk_size: int | str = DEFAULT_CHUNK_SIZE,
        dimension: int = DEFAULT_DIMENSION,
        stream_name: str = DEFAULT_STREAM,
        build_ann_index: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.grpc_conn_id = grpc_conn_id
        self.postgres_conn_id = postgres_conn_id
        self.last_processed_uuid = last_processed_uuid
        self.chunk_size = chunk_size
        self.dimension = dimension
        self.stream_name = stream_name
        self.build_ann_index = build_ann_index

    def _resume_param(self) -> str | None:
        value = (self.last_processed_uuid or "").strip()
        if value.lower() in ("", "none", "null"):
            return None
        return canonical_uuid(value)

    def execute(self, context: Context) -> dict[str, Any]:
        chunk_size = int(self.chunk_size)
        requested = self._resume_param()
        tables = TableNames()
        hook = GrpcEmbeddingHook(self.grpc_conn_id)
        conn = psycopg3_connection(PostgresHook(postgres_conn_id=self.postgres_conn_id))
        with contextlib.closing(conn), contextlib.closing(hook):
            apply_schema(conn, self.dimension, tables)
            stored = read_checkpoint(conn, tables, self.stream_name)
            start = requested if requested is not None else stored
            self.log.info(
                "streaming rows after %s (requested %s, stored checkpoint %s), chunk size %d",
                start or "the beginning",
                requested or "-",
                stored or "-",
                chunk_size,
            )
            writer = ChunkWriter(conn, dimension=self.dimension, tables=tables, stream_name=self.stream_name)
            ti = context["ti"]
            origin = {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id, "map_index": ti.map_index}
            stats = ingest_chunks(
                prefetch(hook.stream_chunks(after=start, chunk_size=chunk_size)),
                writer,
                dimension=self.dimension,
                origin=origin,
            )
            if self.build_ann_index and ensure_ann_index(conn, tables):
                self.log.info("built the ivfflat index on %s", tables.embedding)
        result = stats.as_dict()
        result["start_after"] = start
        result["last_processed_uuid"] = stats.last_processed_uuid or start
        self.log.info(
            "stored %d rows (%d new, %d changed, %d unchanged), %d to the DLQ %s, in %d chunks, "
            "%.1f s, %.0f rows/s; checkpoint %s",
            stats.rows_stored,
            stats.inserted,
            stats.updated,
            stats.unchanged,
            stats.rows_dlq,
            dict(stats.dlq_by_reason),
            stats.chunks,
            stats.seconds,
            stats.rows_per_second,
            result["last_processed_uuid"],
        )
        ti.xcom_push(key="checkpoint", value=result["last_processed_uuid"])
        return result
