"""``storage/schema.py`` against a real PostgreSQL with pgvector: the script, its guard, the ANN index."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from airflow_embedding_provider.storage.schema import (
    DEFAULT_TABLES,
    SchemaMismatchError,
    TableNames,
    apply_schema,
    ensure_ann_index,
    schema_text,
    vector_dimension,
)

DIM = 8
REPO = Path(__file__).resolve().parents[3]
CUSTOM = TableNames(
    metadata="m_meta",
    embedding="m_emb",
    dlq="m_dlq",
    checkpoint="m_ckpt",
    outbox="m_outbox",
    progress="m_progress",
)


def _exists(conn: psycopg.Connection, name: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
    return bool(row and row[0])


def _relations(tables: TableNames) -> list[str]:
    """Every table and index name the script creates for ``tables``, unquoted."""
    return [
        tables.metadata,
        tables.embedding,
        tables.dlq,
        tables.checkpoint,
        tables.outbox,
        tables.progress,
        f"{tables.outbox}_pending_key",
        f"{tables.dlq}_id_idx",
        f"{tables.dlq}_row_key_key",
        f"{tables.checkpoint}_stream_name_key",
    ]


def _fill(conn: psycopg.Connection, rows: int, tables: TableNames = DEFAULT_TABLES) -> None:
    with conn.transaction():
        conn.execute(
            f"INSERT INTO {tables.metadata} (id) SELECT gen_random_uuid() FROM generate_series(1, %s)", (rows,)
        )
        conn.execute(
            f"INSERT INTO {tables.embedding} (id, vector) "
            f"SELECT id, array_fill(random()::real, ARRAY[{DIM}])::vector FROM {tables.metadata}"
        )


def _index_definition(conn: psycopg.Connection, name: str) -> str | None:
    row = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (name,)).fetchone()
    return None if row is None else str(row[0])


def test_the_schema_text_is_the_repository_file() -> None:
    assert schema_text() == (REPO / "include" / "sql" / "schema.sql").read_text(encoding="utf-8")


def test_apply_schema_creates_every_relation_at_the_dimension(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert vector_dimension(conn, DEFAULT_TABLES.embedding) is None  # no table yet
        apply_schema(conn, DIM)
        missing = [name for name in _relations(DEFAULT_TABLES) if not _exists(conn, name)]
        assert not missing
        assert vector_dimension(conn, DEFAULT_TABLES.embedding) == DIM


def test_custom_table_names_are_used_everywhere(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, DIM, CUSTOM)
        assert all(_exists(conn, name) for name in _relations(CUSTOM))
        assert not _exists(conn, DEFAULT_TABLES.metadata)
        assert vector_dimension(conn, CUSTOM.embedding) == DIM


@pytest.mark.parametrize("dimension", [0, 16001])
def test_a_dimension_pgvector_cannot_declare_is_refused_before_any_statement(pg_dsn: str, dimension: int) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(ValueError, match=f"dimension {dimension} is out of range 1..16000"):
            apply_schema(conn, dimension)
        assert not _exists(conn, DEFAULT_TABLES.metadata)


def test_a_dimension_change_names_both_dimensions_and_changes_nothing(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, DIM)
        with pytest.raises(SchemaMismatchError, match=r"stores vector\(8\) but the configured dimension is 16"):
            apply_schema(conn, 16)
        assert vector_dimension(conn, DEFAULT_TABLES.embedding) == DIM


def test_a_dropped_index_brings_the_script_back(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, DIM)
        conn.execute(f"DROP INDEX {DEFAULT_TABLES.dlq}_row_key_key")
        apply_schema(conn, DIM)
        assert _exists(conn, f"{DEFAULT_TABLES.dlq}_row_key_key")


def test_concurrent_set_up_on_an_empty_database_succeeds_once(pg_dsn: str) -> None:
    """Mapped tasks apply the schema at the same moment; the advisory lock serialises them."""
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def set_up() -> None:
        try:
            with psycopg.connect(pg_dsn, autocommit=True) as conn:
                start.wait(timeout=30)
                apply_schema(conn, DIM)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=set_up) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    with psycopg.connect(pg_dsn) as conn:
        assert vector_dimension(conn, DEFAULT_TABLES.embedding) == DIM


def test_ivfflat_lists_follow_the_row_count(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, DIM)
        _fill(conn, 2500)
        assert ensure_ann_index(conn) is True
        definition = _index_definition(conn, f"{DEFAULT_TABLES.embedding}_ivfflat")
        assert definition is not None and "ivfflat" in definition and "lists='2'" in definition


def test_the_ann_index_of_custom_tables_is_named_for_them(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        apply_schema(conn, DIM, CUSTOM)
        _fill(conn, 10, CUSTOM)
        assert ensure_ann_index(conn, CUSTOM, "hnsw") is True
        definition = _index_definition(conn, f"{CUSTOM.embedding}_hnsw")
        assert definition is not None and f"ON public.{CUSTOM.embedding} USING hnsw" in definition
        assert _index_definition(conn, f"{DEFAULT_TABLES.embedding}_hnsw") is None
