"""OpenLineage datasets of an ingest: the AI server's stream in, the two tables and the DLQ out.

OpenLineage is optional: nothing here imports it at module level, and :func:`ingest_lineage`
returns ``None`` when ``apache-airflow-providers-openlineage`` is not installed (Airflow then
never asks for lineage anyway). Dataset names follow OpenLineage's naming: ``grpc://host:port``
with the stream as the name for the source, ``postgres://host:port`` with
``database.schema.table`` for the tables, as the Postgres provider names them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import psycopg

from airflow_embedding_provider.storage.schema import TableNames

#: Output roles -> the TableNames attribute of their table.
OUTPUT_TABLES = ("metadata", "embedding", "dlq")


def openlineage_available() -> bool:
    """Whether the OpenLineage provider is installed (checked before any lineage work)."""
    try:
        import airflow.providers.openlineage.extractors  # noqa: F401
    except ImportError:
        return False
    return True


def postgres_namespace(conn: psycopg.Connection) -> tuple[str, str]:
    """``(postgres://host:port, database)`` of a live connection, as OpenLineage names Postgres."""
    info = conn.info
    return f"postgres://{info.host}:{info.port}", info.dbname


def table_columns(
    conn: psycopg.Connection, tables: TableNames, schema: str = "public"
) -> dict[str, list[tuple[str, str]]]:
    """Column names and types of the output tables, read from the database (never out of date)."""
    names = [getattr(tables, role) for role in OUTPUT_TABLES]
    rows = conn.execute(
        "SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
        "JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = ANY(%s) AND a.attnum > 0 AND NOT a.attisdropped "
        "ORDER BY c.relname, a.attnum",
        (schema, names),
    ).fetchall()
    out: dict[str, list[tuple[str, str]]] = {name: [] for name in names}
    for table, column, kind in rows:
        out[table].append((column, kind))
    return out


def ingest_lineage(
    *,
    grpc_target: str | None,
    stream_name: str,
    conn: psycopg.Connection,
    tables: TableNames,
    row_counts: Mapping[str, int],
    table_inputs: Sequence[str] = (),
    schema: str = "public",
) -> Any:
    """An ``OperatorLineage``, or ``None`` without the OpenLineage provider.

    :param grpc_target: ``host:port`` of the AI server, an input; ``None`` when it was not asked.
    :param row_counts: rows written per output role (``metadata``, ``embedding``, ``dlq``).
    :param table_inputs: output roles that were read too (the DLQ, for a replay).
    """
    try:
        from airflow.providers.common.compat.openlineage.facet import (
            Dataset,
            OutputDataset,
            OutputStatisticsOutputDatasetFacet,
            SchemaDatasetFacet,
            SchemaDatasetFacetFields,
        )
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None
    namespace, database = postgres_namespace(conn)
    columns = table_columns(conn, tables, schema)

    def schema_facet(table: str) -> Any:
        fields = [SchemaDatasetFacetFields(name=name, type=kind) for name, kind in columns.get(table, [])]
        return SchemaDatasetFacet(fields=fields)

    inputs = [Dataset(namespace=f"grpc://{grpc_target}", name=stream_name)] if grpc_target else []
    for role in table_inputs:
        table = getattr(tables, role)
        inputs.append(
            Dataset(namespace=namespace, name=f"{database}.{schema}.{table}", facets={"schema": schema_facet(table)})
        )
    outputs = []
    for role in OUTPUT_TABLES:
        table = getattr(tables, role)
        outputs.append(
            OutputDataset(
                namespace=namespace,
                name=f"{database}.{schema}.{table}",
                facets={"schema": schema_facet(table)},
                outputFacets={
                    "outputStatistics": OutputStatisticsOutputDatasetFacet(rowCount=int(row_counts.get(role, 0)))
                },
            )
        )
    return OperatorLineage(inputs=inputs, outputs=outputs)
