"""psycopg 3 connections from Airflow Postgres connections, the way the storage layer needs them."""

from __future__ import annotations

import psycopg
from airflow.providers.postgres.hooks.postgres import PostgresHook

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
