"""Apply ``include/sql/schema.sql`` and check the vector dimension of an existing table."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

SCHEMA_FILE = "schema.sql"
# Any constant works; it serialises concurrent schema set-up (parallel mapped tasks).
_SCHEMA_LOCK = 0x7265637275697401
# Its own lock for the ANN index build, which can take minutes: schema set-up must not wait on it.
_ANN_INDEX_LOCK = 0x7265637275697402
#: pgvector's ANN index methods this package can build (see :func:`ensure_ann_index`).
_ANN_ACCESS_METHODS = {"ivfflat": sql.SQL("ivfflat"), "hnsw": sql.SQL("hnsw")}
ANN_METHODS = tuple(_ANN_ACCESS_METHODS)
#: The index the ingest builds when not told: its build is seconds where HNSW's is minutes (README, Search).
DEFAULT_ANN_METHOD = "ivfflat"


# What the script creates; all must exist for it to be skipped.
_SCHEMA_RELATIONS = (
    "metadata",
    "embedding",
    "dlq",
    "checkpoint",
    "outbox",
    "progress",
    "outbox_pending_index",
    "dlq_id_index",
    "dlq_row_key_index",
    "checkpoint_stream_index",
    "search_settings",
)


class SchemaMismatchError(RuntimeError):
    """The database holds a table that does not fit the configuration."""


@dataclass(frozen=True)
class TableNames:
    """The tables the provider writes; defaults are the design's names."""

    metadata: str = "recruit_metadata"
    embedding: str = "recruit_embedding"
    dlq: str = "recruit_embedding_dlq"
    checkpoint: str = "embedding_batch_checkpoint"
    outbox: str = "embedding_cache_outbox"
    progress: str = "embedding_partition_progress"
    search_settings: str = "embedding_search_settings"

    def identifiers(self) -> dict[str, sql.Composable]:
        return {
            "metadata": sql.Identifier(self.metadata),
            "embedding": sql.Identifier(self.embedding),
            "dlq": sql.Identifier(self.dlq),
            "checkpoint": sql.Identifier(self.checkpoint),
            "outbox": sql.Identifier(self.outbox),
            "progress": sql.Identifier(self.progress),
            "outbox_pending_index": sql.Identifier(f"{self.outbox}_pending_key"),
            "dlq_id_index": sql.Identifier(f"{self.dlq}_id_idx"),
            "dlq_row_key_index": sql.Identifier(f"{self.dlq}_row_key_key"),
            "checkpoint_stream_index": sql.Identifier(f"{self.checkpoint}_stream_name_key"),
            "search_settings": sql.Identifier(self.search_settings),
        }

    def ann_index(self, method: str) -> sql.Identifier:
        """The name of the ANN index this package manages with ``method`` (one of ANN_METHODS)."""
        return sql.Identifier(f"{self.embedding}_{method}")


DEFAULT_TABLES = TableNames()


def schema_text() -> str:
    """The schema file: packaged into the wheel under ``sql/``, or ``include/sql`` in a checkout."""
    packaged = resources.files("airflow_embedding_provider").joinpath("sql", SCHEMA_FILE)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parents[2] / "include" / "sql" / SCHEMA_FILE).read_text(encoding="utf-8")


def vector_dimension(conn: psycopg.Connection, table: str) -> int | None:
    """The declared dimension of ``table.vector``, or ``None`` when the table does not exist."""
    row = conn.execute(
        "SELECT a.atttypmod FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attname = 'vector'",
        (sql.Identifier(table).as_string(conn),),
    ).fetchone()
    return None if row is None else int(row[0])


def apply_schema(conn: psycopg.Connection, dimension: int, tables: TableNames = DEFAULT_TABLES) -> None:
    """Create what is missing; stop with :class:`SchemaMismatchError` on a dimension change.

    A dimension change means the model upstream changed: the stored vectors cannot be compared with
    new ones, so the run stops instead of mixing them (docs/design.md §4.3). Re-embed or migrate first.
    """
    if not 1 <= dimension <= 16000:
        raise ValueError(f"dimension {dimension} is out of range 1..16000 (pgvector's limit)")
    ids = tables.identifiers()
    statement = sql.SQL(schema_text()).format(dimension=sql.Literal(dimension), **ids)
    text = statement.as_string(conn)
    marker = f"airflow-embedding-provider schema {hashlib.sha256(text.encode()).hexdigest()[:16]}"
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        existing = vector_dimension(conn, tables.embedding)
        if existing is not None and existing != dimension:
            raise SchemaMismatchError(
                f"table {tables.embedding} stores vector({existing}) but the configured dimension is "
                f"{dimension}: the embedding model changed. Re-create or migrate the table, or set the "
                f"dimension back to {existing}."
            )
        # The script's ALTER TABLE / CREATE INDEX IF NOT EXISTS lock their tables even when there
        # is nothing to do, so every run would queue behind (and block) other sessions' writes:
        # the script runs only when the schema it last applied (a marker comment) differs.
        # A dropped table (or index) brings the script back.
        names = [ids[k].as_string(conn) for k in _SCHEMA_RELATIONS]
        applied = conn.execute(
            "SELECT obj_description(to_regclass(%s), 'pg_class'), bool_and(to_regclass(n) IS NOT NULL) "
            "FROM unnest(%s::text[]) AS n",
            (ids["progress"].as_string(conn), names),
        ).fetchone()
        if applied is not None and applied == (marker, True):
            return
        conn.execute(statement)
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(ids["progress"], sql.Literal(marker)))


#: The most memory an ANN index build asks for (``SET LOCAL maintenance_work_mem``) unless told otherwise.
DEFAULT_MAX_BUILD_MEMORY = "1GB"
#: pgvector's HNSW default ``m`` (neighbours a node), which :func:`ensure_ann_index` builds with.
HNSW_M = 16


def ivfflat_build_bytes(rows: int, dimension: int, lists: int) -> int:
    """Memory pgvector's ivfflat build asks for: its k-means samples (50 a list, at least 10,000,
    at most every row), Elkan's lower bounds (a float per sample and list) and three sets of
    centres. Measured against pgvector 0.8.6's "memory required is N MB": within 3 %."""
    item = 4 * dimension + 8
    samples = min(rows, max(50 * lists, 10_000))
    return samples * item + samples * lists * 4 + 3 * lists * item


def hnsw_build_bytes(rows: int, dimension: int, m: int = HNSW_M) -> int:
    """Memory that holds pgvector's HNSW graph while it is built: each row's vector, its layer-0
    neighbour list (2 m entries with distances) and the element's own header. A graph larger than
    ``maintenance_work_mem`` is not an error but builds far slower (pgvector: "no longer fits")."""
    return rows * (4 * dimension + 8 + 2 * m * 16 + 200)


def _size_build_memory(conn: psycopg.Connection, needed: int, max_build_memory: str | int) -> str:
    """``SET LOCAL maintenance_work_mem`` for this transaction's build: what it needs plus headroom,
    never less than the server's setting, never more than ``max_build_memory`` (a size PostgreSQL
    reads, ``"1GB"``, or bytes); a user's server has PostgreSQL's 64 MB by default (README, Search)."""
    row = conn.execute(
        "SELECT pg_size_bytes(current_setting('maintenance_work_mem')), pg_size_bytes(%s)", (str(max_build_memory),)
    ).fetchone()
    assert row is not None
    current, cap = int(row[0]), int(row[1])
    wanted = int(needed * 1.1) + (8 << 20)
    chosen = max(current, min(wanted, max(cap, current)))
    if wanted > max(cap, current):
        log.warning(
            "the index build needs about %d MB but max_build_memory is %d MB: it may fail (ivfflat) or build "
            "slowly (HNSW); raise max_build_memory, or lower the ivfflat lists",
            wanted >> 20,
            cap >> 20,
        )
    kb = chosen >> 10
    conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (f"{kb}kB",))
    return f"{kb >> 10}MB"


def ensure_ann_index(
    conn: psycopg.Connection,
    tables: TableNames = DEFAULT_TABLES,
    method: str = DEFAULT_ANN_METHOD,
    *,
    max_build_memory: str | int = DEFAULT_MAX_BUILD_MEMORY,
) -> bool:
    """Build the ANN index of ``method`` (``ivfflat`` or ``hnsw``) once the table has rows.

    ivfflat learns its lists from the rows present when it is built, so an index built on an empty
    table serves searches badly: it is built after the first load, ``lists`` from the row count
    (pgvector: rows / 1000). HNSW needs no training, but pgvector advises building it after the
    initial load too, rather than growing the graph row by row; it uses pgvector's defaults (m 16,
    ef_construction 64). The build blocks writes to the embedding table while it runs. Its memory
    (``maintenance_work_mem``) is sized for this transaction alone, up to ``max_build_memory``:
    a server's default 64 MB stops ivfflat past about 420,000 rows of 384-d. Once it is built, the
    other method's index (from runs with the other setting) is dropped in the same transaction,
    so writes keep one ANN index up to date. Returns ``True`` when this call built it.
    """
    if method not in ANN_METHODS:
        raise ValueError(f"ANN index method must be one of {', '.join(ANN_METHODS)}, got {method!r}")
    ids = tables.identifiers()
    index = tables.ann_index(method)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_ANN_INDEX_LOCK,))
        exists = conn.execute("SELECT to_regclass(%s)", (index.as_string(conn),)).fetchone()
        if exists and exists[0] is not None:
            return False
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ids["embedding"])).fetchone()
        rows = int(count[0]) if count else 0
        if rows == 0:
            return False
        dimension = vector_dimension(conn, tables.embedding) or 1
        options: sql.Composable = sql.SQL("")
        if method == "ivfflat":
            lists = max(1, min(rows // 1000, 4000))
            options = sql.SQL("WITH (lists = {})").format(sql.Literal(lists))
            needed = ivfflat_build_bytes(rows, dimension, lists)
        else:
            needed = hnsw_build_bytes(rows, dimension)
        memory = _size_build_memory(conn, needed, max_build_memory)
        log.info("building %s on %d rows of %d-d with maintenance_work_mem %s", method, rows, dimension, memory)
        conn.execute(
            sql.SQL("CREATE INDEX {} ON {} USING {} (vector vector_l2_ops) {}").format(
                index, ids["embedding"], _ANN_ACCESS_METHODS[method], options
            )
        )
        for other in ANN_METHODS:
            if other != method:
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(tables.ann_index(other)))
    return True


def ann_index_method(conn: psycopg.Connection, tables: TableNames = DEFAULT_TABLES) -> str | None:
    """The method of the ANN index this package manages on the embedding table, if one exists."""
    for method in ANN_METHODS:
        found = conn.execute("SELECT to_regclass(%s)", (tables.ann_index(method).as_string(conn),)).fetchone()
        if found and found[0] is not None:
            return method
    return None


def ivfflat_lists(conn: psycopg.Connection, tables: TableNames = DEFAULT_TABLES) -> int:
    """The ``lists`` the package's ivfflat index was built with (pgvector's default 100 when unset)."""
    row = conn.execute(
        "SELECT option_value::int FROM pg_options_to_table((SELECT reloptions FROM pg_class WHERE oid = to_regclass(%s))) "
        "WHERE option_name = 'lists'",
        (tables.ann_index("ivfflat").as_string(conn),),
    ).fetchone()
    return int(row[0]) if row else 100
