"""psycopg 3 connections from Airflow Postgres connections, the way the storage layer needs them, and search."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import psycopg
from airflow.providers.postgres.hooks.postgres import PostgresHook

from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, TableNames
from airflow_embedding_provider.storage.search import Searcher, SearchFilter
from airflow_embedding_provider.storage.session import SessionTimeouts


def psycopg3_connection(postgres_conn_id: str, timeouts: SessionTimeouts | None = None) -> psycopg.Connection:
    """An autocommit psycopg 3 connection through the Postgres provider's ``PostgresHook``, with
    ``statement_timeout`` and ``lock_timeout`` set (:class:`SessionTimeouts`, from the environment
    by default) so that a stuck lock fails the task instead of hanging it.

    psycopg 3 because COPY BINARY and pgvector's adapter need it. Autocommit because every write
    of the storage layer runs in an explicit ``conn.transaction()``: with autocommit off, a bare
    read would open an implicit transaction that turns those into savepoints nobody commits.
    """
    conn = PostgresHook(postgres_conn_id=postgres_conn_id).get_conn()
    if not isinstance(conn, psycopg.Connection):
        conn.close()
        raise RuntimeError(
            "the Postgres provider returned a psycopg2 connection; this provider needs psycopg 3: "
            "install psycopg[binary]>=3.2 with SQLAlchemy 2 (the postgres provider then uses psycopg 3)"
        )
    conn.autocommit = True
    try:
        (timeouts or SessionTimeouts.from_env()).apply(conn)
    except BaseException:
        conn.close()
        raise
    return conn


class PgvectorSearchHook(PostgresHook):
    """Nearest-neighbour search over the embeddings of a Postgres connection (storage/search.py).

    Searches go through the ANN index with the setting the last recall gate chose (finalize), and
    filtered searches return ``k`` rows whenever ``k`` rows match.

    :param postgres_conn_id: the Postgres connection holding ``recruit_embedding``.
    :param tables: the provider's table names (the design's by default).
    """

    hook_name = "pgvector search"

    def __init__(self, *args: Any, tables: TableNames = DEFAULT_TABLES, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tables = tables

    def search(
        self, vectors: Any, k: int = 10, filters: Sequence[str | SearchFilter] = ()
    ) -> list[list[dict[str, Any]]]:
        """The ``k`` nearest rows of each query, nearest first: ``id``, ``distance`` (L2) and the metadata.

        :param vectors: one query vector ``(dim,)`` or several ``(q, dim)``.
        :param k: rows a query.
        :param filters: e.g. ``["primary_keyword=Python", "english_level>=upper", "exp_years<=3"]``.
        :raises SearchError: a bad filter, a dimension that does not match the table, no table.
        """
        with contextlib.closing(psycopg3_connection(self.get_conn_id())) as conn:
            hits = Searcher(conn, self.tables).search(vectors, k, filters)
        return [[hit.as_dict() for hit in query] for query in hits]

    def get_conn_id(self) -> str:
        return str(getattr(self, self.conn_name_attr))
