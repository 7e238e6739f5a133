"""``EmbeddingDlqReplayOperator``: re-validate and re-store dead-lettered rows (docs/design.md §7.3 (4)).

The replay itself is :mod:`airflow_embedding_provider.replay`; this operator renders its scope,
opens the connections through the hooks and reports what it did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
from airflow_embedding_provider.hooks.postgres import EmbeddingPostgresHook
from airflow_embedding_provider.lineage import ingest_lineage, openlineage_available
from airflow_embedding_provider.operators._rendered import flag, instant, strings
from airflow_embedding_provider.replay import DEFAULT_BATCH_SIZE, replay_dlq
from airflow_embedding_provider.rows import DEFAULT_DIMENSION, canonical_uuid
from airflow_embedding_provider.storage.checkpoint import DEFAULT_STREAM
from airflow_embedding_provider.storage.dlq import DlqScope
from airflow_embedding_provider.storage.outbox import DEFAULT_CACHE_TARGET, CacheRequest
from airflow_embedding_provider.storage.schema import apply_schema
from airflow_embedding_provider.storage.writer import ChunkWriter

if TYPE_CHECKING:
    from airflow.sdk import Context
    from airflow.sdk.types import RuntimeTaskInstanceProtocol

__all__ = ["DEFAULT_BATCH_SIZE", "EmbeddingDlqReplayOperator"]


class EmbeddingDlqReplayOperator(BaseOperator):
    """Replays pending ``recruit_embedding_dlq`` entries into the tables.

    Every pending entry in scope is re-validated against ``dimension``; a row that passes is
    upserted (metadata, then embedding) and its entry marked ``resolved`` in the same transaction;
    a row that fails again keeps its entry, with ``attempts`` counted up and the latest reason. No
    second entry is ever created for a replayed row. A row replayed from its stored payload is not
    written when its id was stored after the entry was created (a newer version arrived since):
    the entry is marked ``superseded`` instead. Resolved and superseded entries are not pending, so
    replaying again selects nothing: the operator is idempotent. Returns
    ``{selected, resolved, superseded, still_failing, by_reason, ...}`` (see :class:`ReplayStats`).

    :param postgres_conn_id: PostgreSQL connection. Templated.
    :param grpc_conn_id: ``embedding_grpc`` connection of the AI server, used with ``refetch``.
        Templated.
    :param dimension: the vector dimension the tables are (or are to be) declared with.
    :param ids: replay only the entries of these row ids (UUIDs): a list, a JSON array or
        ``a,b,c``. Templated.
    :param since: only entries created at or after this ISO 8601 date-time (UTC when no zone is
        given). Templated.
    :param until: only entries created before this ISO 8601 date-time. Templated.
    :param error_kinds: only entries with these ``error_kind`` values. Templated.
    :param refetch: ask the AI server for its current version of each row (when the row's id is a
        UUID) and replay that, over whatever is stored; rows the server does not hold are replayed
        from the stored payload, which never replaces a newer stored version. Templated.
    :param batch_size: entries a transaction. Templated.
    :param delete_resolved: delete settled entries instead of keeping them as ``resolved`` or
        ``superseded`` (kept by default, as an audit trail).
    :param cache_target: the API server cache that a replay which changes rows marks stale.
    """

    template_fields: Sequence[str] = (
        "postgres_conn_id",
        "grpc_conn_id",
        "ids",
        "since",
        "until",
        "error_kinds",
        "refetch",
        "batch_size",
    )
    ui_color = "#fdebd0"

    def __init__(
        self,
        *,
        postgres_conn_id: str = EmbeddingPostgresHook.default_conn_name,
        grpc_conn_id: str = GrpcEmbeddingHook.default_conn_name,
        dimension: int = DEFAULT_DIMENSION,
        ids: Sequence[str] | str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        error_kinds: Sequence[str] | str | None = None,
        refetch: bool | str = False,
        batch_size: int | str = DEFAULT_BATCH_SIZE,
        delete_resolved: bool = False,
        cache_target: str = DEFAULT_CACHE_TARGET,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.postgres_conn_id = postgres_conn_id
        self.grpc_conn_id = grpc_conn_id
        self.dimension = dimension
        self.ids = ids
        self.since = since
        self.until = until
        self.error_kinds = error_kinds
        self.refetch = refetch
        self.batch_size = batch_size
        self.delete_resolved = delete_resolved
        self.cache_target = cache_target
        #: rows this task wrote per output (metadata, embedding, dlq), for OpenLineage
        self._lineage_counts: dict[str, int] = {}
        self._refetched = False

    @cached_property
    def postgres_hook(self) -> EmbeddingPostgresHook:
        """The tables and connections of ``postgres_conn_id``."""
        return EmbeddingPostgresHook(postgres_conn_id=self.postgres_conn_id)

    def scope(self) -> DlqScope:
        """The rendered scope parameters, checked."""
        scope = DlqScope(
            ids=tuple(canonical_uuid(v) for v in strings(self.ids)),
            since=instant(self.since, "since"),
            until=instant(self.until, "until"),
            error_kinds=tuple(strings(self.error_kinds)),
        )
        if scope.since is not None and scope.until is not None and scope.since >= scope.until:
            raise ValueError(f"since ({scope.since.isoformat()}) must be before until ({scope.until.isoformat()})")
        return scope

    def execute(self, context: Context) -> dict[str, Any]:
        scope = self.scope()
        refetch = flag(self.refetch, "refetch")
        batch_size = int(self.batch_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        ti = context["ti"]
        self.log.info(
            "replaying pending DLQ entries: ids=%s since=%s until=%s error_kinds=%s refetch=%s dimension=%d",
            list(scope.ids) or "any",
            scope.since or "-",
            scope.until or "-",
            list(scope.error_kinds) or "any",
            refetch,
            self.dimension,
        )
        hook = GrpcEmbeddingHook(self.grpc_conn_id) if refetch else None
        conn = self.postgres_hook.get_psycopg3_conn()
        with contextlib.closing(conn), contextlib.ExitStack() as stack:
            if hook is not None:
                stack.callback(hook.close)
            # Creates the tables at the configured dimension after a migration, and stops the run
            # when the configuration still disagrees with the tables.
            apply_schema(conn, self.dimension, self.postgres_hook.tables)
            writer = ChunkWriter(
                conn,
                dimension=self.dimension,
                tables=self.postgres_hook.tables,
                cache_request=CacheRequest(self.cache_target, f"{ti.dag_id}/{ti.run_id}/replay"),
            )
            stats = replay_dlq(
                conn,
                writer,
                dimension=self.dimension,
                scope=scope,
                batch_size=batch_size,
                refetch=hook.fetch_row if hook is not None else None,
                delete_resolved=self.delete_resolved,
                tables=self.postgres_hook.tables,
            )
        stored = stats.inserted + stats.updated + stats.unchanged
        self._lineage_counts = {"metadata": stored, "embedding": stored, "dlq": stats.selected}
        self._refetched = refetch
        self.log.info(
            "DLQ replay: %d selected, %d resolved %s (%d new, %d changed, %d unchanged rows), %d re-fetched",
            stats.selected,
            stats.resolved,
            dict(stats.resolved_by_reason),
            stats.inserted,
            stats.updated,
            stats.unchanged,
            stats.refetched,
        )
        if stats.superseded:
            self.log.info(
                "%d entries superseded: their row was stored again after they were dead-lettered, so "
                "their older payload was not written (status 'superseded')",
                stats.superseded,
            )
        if stats.still_failing:
            self.log.warning("%d entries still fail and stay pending: %s", stats.still_failing, dict(stats.by_reason))
        if stats.by_reason.get("dimension_mismatch"):
            self.log.error(
                "%d rows still have another dimension than the configured %d: the embedding model and "
                "the configuration disagree",
                stats.by_reason["dimension_mismatch"],
                self.dimension,
            )
        return stats.as_dict()

    def get_openlineage_facets_on_complete(self, task_instance: RuntimeTaskInstanceProtocol) -> Any:
        """OpenLineage: the DLQ (and with ``refetch`` the AI server) in; the two tables and the DLQ
        out, with their columns and the rows written. ``None`` without the OpenLineage provider."""
        if not openlineage_available():
            return None
        target = GrpcEmbeddingHook(self.grpc_conn_id).settings.target if self._refetched else None
        conn = self.postgres_hook.get_psycopg3_conn()
        with contextlib.closing(conn):
            return ingest_lineage(
                grpc_target=target,
                stream_name=DEFAULT_STREAM,
                conn=conn,
                tables=self.postgres_hook.tables,
                row_counts=self._lineage_counts,
                table_inputs=("dlq",),
            )
