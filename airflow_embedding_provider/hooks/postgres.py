"""``EmbeddingPostgresHook``: the provider's tables on an Airflow Postgres connection, through the
Postgres provider's ``PostgresHook``; and ``PgvectorSearchHook``, search over them.

The operators take their database connections and table names from here rather than opening
connections themselves: psycopg 3, autocommit, with the session timeouts set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from airflow.providers.postgres.hooks.postgres import PostgresHook

from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, TableNames
from airflow_embedding_provider.storage.search import Searcher, SearchFilter
from airflow_embedding_provider.storage.session import SessionTimeouts, timeouts_explained


class EmbeddingPostgresHook(PostgresHook):
    """psycopg 3 connections to the embedding tables of a Postgres connection, the way the storage
    layer needs them, and the tables' names.

    :param postgres_conn_id: the Postgres connection holding the tables.
    :param tables: the provider's table names (the design's by default).
    :param timeouts: ``statement_timeout`` and ``lock_timeout`` of every connection
        (:class:`SessionTimeouts`, from the environment by default).
    """

    hook_name = "Embedding tables (PostgreSQL)"

    def __init__(
        self, *args: Any, tables: TableNames = DEFAULT_TABLES, timeouts: SessionTimeouts | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.tables = tables
        self.timeouts = timeouts

    def get_conn_id(self) -> str:
        return str(getattr(self, self.conn_name_attr))

    def get_psycopg3_conn(self) -> psycopg.Connection:
        """An autocommit psycopg 3 connection through ``PostgresHook.get_conn``, with
        ``statement_timeout`` and ``lock_timeout`` set so that a stuck lock fails the task instead
        of hanging it.

        psycopg 3 because COPY BINARY and pgvector's adapter need it. Autocommit because every write
        of the storage layer runs in an explicit ``conn.transaction()``: with autocommit off, a bare
        read would open an implicit transaction that turns those into savepoints nobody commits.
        """
        conn = self.get_conn()
        if not isinstance(conn, psycopg.Connection):
            conn.close()
            raise RuntimeError(
                "the Postgres provider returned a psycopg2 connection; this provider needs psycopg 3: "
                "install psycopg[binary]>=3.2 with SQLAlchemy 2 (the postgres provider then uses psycopg 3)"
            )
        conn.autocommit = True
        try:
            (self.timeouts or SessionTimeouts.from_env()).apply(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def connections(self, count: int) -> Iterator[list[psycopg.Connection]]:
        """``count`` connections (:meth:`get_psycopg3_conn`), closed afterwards; a lock or statement
        timeout in the body fails with what to do."""
        conns: list[psycopg.Connection] = []
        try:
            with timeouts_explained():
                for _ in range(count):
                    conns.append(self.get_psycopg3_conn())
                yield conns
        except BaseException:
            # Stopped mid-statement (the task's execution_timeout, a signal): closing the socket does
            # not stop a backend waiting on a lock, so cancel what it runs before letting go of it.
            for conn in conns:
                with contextlib.suppress(psycopg.Error):
                    conn.cancel_safe(timeout=5)
            raise
        finally:
            for conn in conns:
                conn.close()


def psycopg3_connection(postgres_conn_id: str, timeouts: SessionTimeouts | None = None) -> psycopg.Connection:
    """One connection of :class:`EmbeddingPostgresHook` (for the CLI, the upload server and the DAGs)."""
    return EmbeddingPostgresHook(postgres_conn_id=postgres_conn_id, timeouts=timeouts).get_psycopg3_conn()


class PgvectorSearchHook(EmbeddingPostgresHook):
    """Nearest-neighbour search over the embeddings of a Postgres connection (storage/search.py).

    Searches go through the ANN index with the setting the last recall gate chose (finalize), and
    filtered searches return ``k`` rows whenever ``k`` rows match.

    :param postgres_conn_id: the Postgres connection holding ``recruit_embedding``.
    :param tables: the provider's table names (the design's by default).
    """

    hook_name = "pgvector search"

    def search(
        self, vectors: Any, k: int = 10, filters: Sequence[str | SearchFilter] = ()
    ) -> list[list[dict[str, Any]]]:
        """The ``k`` nearest rows of each query, nearest first: ``id``, ``distance`` (L2) and the metadata.

        :param vectors: one query vector ``(dim,)`` or several ``(q, dim)``.
        :param k: rows a query.
        :param filters: e.g. ``["primary_keyword=Python", "english_level>=upper", "exp_years<=3"]``.
        :raises SearchError: a bad filter, a dimension that does not match the table, no table.
        """
        with contextlib.closing(self.get_psycopg3_conn()) as conn:
            hits = Searcher(conn, self.tables).search(vectors, k, filters)
        return [[hit.as_dict() for hit in query] for query in hits]
