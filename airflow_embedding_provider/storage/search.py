"""Nearest-neighbour search over the stored embeddings, with filters on their metadata.

Invariants: every search goes through the ANN index with the setting the recall gate chose
(storage/recall.py, table ``embedding_search_settings``); a filtered search returns ``k`` rows
whenever ``k`` rows match. A filter keeping a share ``keep`` of the rows puts its top-k as deep
as the unfiltered top-k/keep, so the tuned setting grows by 1/keep for it; where that reaches
every ivfflat list, or few rows match, exact search over the matching rows is cheaper and is
used instead. pgvector 0.8+ also keeps scanning the index until enough rows pass the filter
(iterative index scans); an older pgvector stops after ``probes`` lists or ``ef_search``
candidates. On every version a query that still comes back short is answered again by exact
search. Filters are parsed into values and composed with
``psycopg.sql``: a column or an operator outside :data:`FILTER_OPERATORS` is refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from airflow_embedding_provider.rows import ENGLISH_LEVELS
from airflow_embedding_provider.storage.schema import (
    DEFAULT_TABLES,
    TableNames,
    ann_index_method,
    ivfflat_lists,
    vector_dimension,
)

log = logging.getLogger(__name__)

#: The operators each filterable column takes: a keyword is matched exactly, a level is "at least"
#: (in the order of ENGLISH_LEVELS), years of experience "at most".
FILTER_OPERATORS: dict[str, tuple[str, ...]] = {
    "primary_keyword": ("=",),
    "english_level": (">=", "="),
    "exp_years": ("<=", "="),
}
#: The ANN setting each index method searches with: pgvector's GUC and its default.
SEARCH_SETTINGS = {"ivfflat": ("ivfflat.probes", 1), "hnsw": ("hnsw.ef_search", 40)}
#: pgvector's GUC that turns on iterative index scans (0.8+), per method.
ITERATIVE_SCAN = {"ivfflat": "ivfflat.iterative_scan", "hnsw": "hnsw.iterative_scan"}
ITERATIVE_SCAN_VERSION = (0, 8, 0)
MAX_K = 1000
#: A filter keeping at most this many rows is answered by exact search over them: about the
#: vectors pgvector's iterative HNSW scan reads at most (``hnsw.max_scan_tuples``' default).
EXACT_FILTER_ROWS = 20_000
_FILTER = re.compile(r"^\s*([a-z_]+)\s*(<=|>=|=|!=|<>|<|>|==)\s*(.*?)\s*$")


class SearchError(ValueError):
    """A search that cannot run as asked: bad filter, wrong dimension, no table. The message says what to fix."""


@dataclass(frozen=True)
class SearchFilter:
    """One condition on ``recruit_metadata``: ``column op value``."""

    column: str
    op: str
    value: str | int

    @classmethod
    def parse(cls, text: str) -> SearchFilter:
        """``primary_keyword=Python``, ``english_level>=upper`` or ``exp_years<=3``."""
        match = _FILTER.match(text)
        if not match:
            raise SearchError(f"filter {text!r}: write COLUMN OP VALUE, e.g. primary_keyword=Python, exp_years<=3")
        column, op, raw = match.groups()
        if column not in FILTER_OPERATORS:
            raise SearchError(f"filter {text!r}: unknown column {column!r}; filterable: {', '.join(FILTER_OPERATORS)}")
        if op not in FILTER_OPERATORS[column]:
            raise SearchError(f"filter {text!r}: {column} takes {' or '.join(FILTER_OPERATORS[column])}, not {op!r}")
        if not raw:
            raise SearchError(f"filter {text!r}: no value after {op!r}")
        value: str | int = raw
        if column == "english_level" and raw not in ENGLISH_LEVELS:
            raise SearchError(f"filter {text!r}: english_level is one of {', '.join(ENGLISH_LEVELS)}")
        if column == "exp_years":
            try:
                value = int(raw)
            except ValueError:
                raise SearchError(f"filter {text!r}: exp_years takes a whole number of years") from None
        return cls(column, op, value)

    def condition(self) -> sql.Composable:
        column = sql.SQL("m.") + sql.Identifier(self.column)
        if self.column == "english_level" and self.op == ">=":
            levels = list(ENGLISH_LEVELS[ENGLISH_LEVELS.index(str(self.value)) :])
            return sql.SQL("{} = ANY({})").format(column, sql.Literal(levels))
        return sql.SQL("{} {} {}").format(column, sql.SQL(self.op), sql.Literal(self.value))


def parse_filters(texts: Iterable[str | SearchFilter]) -> tuple[SearchFilter, ...]:
    return tuple(t if isinstance(t, SearchFilter) else SearchFilter.parse(t) for t in texts)


@dataclass(frozen=True)
class SearchHit:
    id: str
    distance: float
    company_name: str | None
    exp_years: int | None
    english_level: str | None
    primary_keyword: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "distance": round(self.distance, 6),
            "company_name": self.company_name,
            "exp_years": self.exp_years,
            "english_level": self.english_level,
            "primary_keyword": self.primary_keyword,
        }


@dataclass(frozen=True)
class SearchSetting:
    """The ANN search setting in force: ``name`` (a pgvector GUC) = ``value``; from the gate or pgvector's default."""

    method: str
    name: str
    value: int
    recall_at_10: float | None = None
    tuned: bool = False


def pgvector_version(conn: psycopg.Connection) -> tuple[int, ...]:
    """The installed pgvector extension's version, e.g. ``(0, 8, 6)``."""
    row = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if row is None:
        raise SearchError("the pgvector extension is not installed in this database")
    return tuple(int(part) for part in re.findall(r"\d+", str(row[0]))[:3])


def read_search_setting(conn: psycopg.Connection, tables: TableNames = DEFAULT_TABLES) -> SearchSetting | None:
    """The setting stored by the last recall gate for the current index, else pgvector's default; ``None`` without an index."""
    method = ann_index_method(conn, tables)
    if method is None:
        return None
    name, default = SEARCH_SETTINGS[method]
    exists = conn.execute("SELECT to_regclass(%s)", (sql.Identifier(tables.search_settings).as_string(conn),))
    found = exists.fetchone()
    if found and found[0] is not None:
        row = conn.execute(
            sql.SQL("SELECT value, recall_at_10 FROM {} WHERE embedding_table = %s AND method = %s").format(
                sql.Identifier(tables.search_settings)
            ),
            (tables.embedding, method),
        ).fetchone()
        if row is not None:
            return SearchSetting(method, name, int(row[0]), float(row[1]), tuned=True)
    return SearchSetting(method, name, default)


def apply_setting(conn: psycopg.Connection, name: str, value: int | str) -> None:
    """``SET LOCAL name = value`` (inside the caller's transaction)."""
    conn.execute("SELECT set_config(%s, %s, true)", (name, str(value)))


def _as_matrix(vectors: Any, dimension: int) -> npt.NDArray[np.float32]:
    matrix = np.asarray(vectors, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[0] == 0:
        raise SearchError(f"queries must have shape (dim,) or (q, dim), got {tuple(np.shape(vectors))}")
    if matrix.shape[1] != dimension:
        raise SearchError(f"query dimension {matrix.shape[1]} does not match the table's vector({dimension})")
    if not np.isfinite(matrix).all():
        raise SearchError("queries hold NaN or infinite values")
    return matrix


class Searcher:
    """Top-k search over one database connection (autocommit; each call runs its own transactions).

    :param exact_filter_rows: a filter keeping at most this many rows is answered exactly.
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        tables: TableNames = DEFAULT_TABLES,
        *,
        exact_filter_rows: int = EXACT_FILTER_ROWS,
    ) -> None:
        self.conn = conn
        self.tables = tables
        self.exact_filter_rows = exact_filter_rows
        dimension = vector_dimension(conn, tables.embedding)
        if dimension is None:
            raise SearchError(f"table {tables.embedding} does not exist: load rows first")
        self.dimension = dimension
        self.version = pgvector_version(conn)
        self.iterative = self.version >= ITERATIVE_SCAN_VERSION
        if not self.iterative:
            log.warning(
                "pgvector %s has no iterative index scans (0.8+): a filtered search that the index "
                "answers short (the filter drops what probes/ef_search found) is searched again exactly, "
                "which scans every matching row; upgrade pgvector to keep such searches on the index",
                ".".join(map(str, self.version)),
            )
        register_vector(conn)

    def _query(self, where: sql.Composable) -> sql.Composed:
        ids = self.tables.identifiers()
        return sql.SQL(
            "SELECT e.id::text, e.vector <-> %(q)s AS distance, m.company_name, m.exp_years, m.english_level, "
            "m.primary_keyword FROM {embedding} e JOIN {metadata} m ON m.id = e.id WHERE {where} "
            "ORDER BY e.vector <-> %(q)s LIMIT %(k)s"
        ).format(embedding=ids["embedding"], metadata=ids["metadata"], where=where)

    def _matches(self, where: sql.Composable) -> tuple[int, int]:
        """Rows the filter keeps, and all rows (one scan of the metadata table)."""
        ids = self.tables.identifiers()
        row = self.conn.execute(
            sql.SQL("SELECT count(*) FILTER (WHERE {}), count(*) FROM {} m").format(where, ids["metadata"])
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def _filtered_plan(self, where: sql.Composable, setting: SearchSetting, k: int) -> int | None:
        """The setting for a filtered search, or ``None`` when exact search is the better plan.

        A filter keeping a share ``keep`` of the rows puts the filtered top-k about as deep as the
        unfiltered top-k/keep: the tuned setting, which reaches the target for the unfiltered
        top-k, grows by 1/keep (ivfflat up to all lists, ef_search up to pgvector's 1,000). When
        that reaches every list, or few rows match (EXACT_FILTER_ROWS), exact search over the
        matching rows reads fewer vectors than the index would (bench/RESULTS.md "Search").
        """
        matches, total = self._matches(where)
        keep = max(matches / total, 1e-9) if total else 1.0
        if matches <= self.exact_filter_rows:
            return None
        grown = int(np.ceil(setting.value / keep))
        if setting.method == "ivfflat":
            return None if grown >= ivfflat_lists(self.conn, self.tables) else grown
        return min(1000, max(setting.value, grown, 2 * k))

    def search(
        self, vectors: Any, k: int = 10, filters: Sequence[str | SearchFilter] = (), *, exact: bool = False
    ) -> list[list[SearchHit]]:
        """The ``k`` nearest rows (L2) of each query, nearest first, matching every filter.

        :param vectors: one query ``(dim,)`` or several ``(q, dim)``.
        :param k: rows a query (1..1000).
        :param filters: :class:`SearchFilter` or their text form (``exp_years<=3``); all must hold.
        :param exact: search without the index (the truth the recall gate compares with).
        """
        if not 1 <= int(k) <= MAX_K:
            raise SearchError(f"k must be between 1 and {MAX_K}, got {k}")
        k = int(k)
        matrix = _as_matrix(vectors, self.dimension)
        parsed = parse_filters(filters)
        where = sql.SQL(" AND ").join([f.condition() for f in parsed]) if parsed else sql.SQL("TRUE")
        setting = None if exact else read_search_setting(self.conn, self.tables)
        results: list[list[SearchHit]] = [[] for _ in range(len(matrix))]
        short = list(range(len(matrix)))
        if setting is not None:
            short = self._ann(matrix, k, where, parsed, setting, results)
        if short:
            self._exact(matrix, k, where, short, results)
        return results

    def _ann(
        self,
        matrix: npt.NDArray[np.float32],
        k: int,
        where: sql.Composable,
        filters: Sequence[SearchFilter],
        setting: SearchSetting,
        results: list[list[SearchHit]],
    ) -> list[int]:
        value = setting.value
        with self.conn.transaction():
            if filters:
                plan = self._filtered_plan(where, setting, k)
                if plan is None:
                    return list(range(len(matrix)))  # exact search is cheaper and exact
                value = plan
                if self.iterative:
                    # HNSW can keep the scan's order strictly; ivfflat has relaxed_order only (the
                    # rows are sorted again below). Either keeps scanning until k rows pass.
                    order = "strict_order" if setting.method == "hnsw" else "relaxed_order"
                    apply_setting(self.conn, ITERATIVE_SCAN[setting.method], order)
            if setting.method == "hnsw":
                value = max(value, k)  # HNSW returns at most ef_search rows
            apply_setting(self.conn, setting.name, value)
            statement = self._query(where)
            short = []
            for i, query in enumerate(matrix):
                # prepare=False: a cached generic plan would outlive the SET LOCAL above.
                rows = self.conn.execute(statement, {"q": query, "k": k}, prepare=False).fetchall()
                results[i] = sorted((SearchHit(r[0], float(r[1]), *r[2:]) for r in rows), key=lambda h: h.distance)
                if len(rows) < k:
                    short.append(i)
        if short and filters:
            log.info(
                "%d of %d queries found fewer than %d rows through the index: exact search", len(short), len(matrix), k
            )
        return short

    def _exact(
        self,
        matrix: npt.NDArray[np.float32],
        k: int,
        where: sql.Composable,
        which: list[int],
        results: list[list[SearchHit]],
    ) -> None:
        with self.conn.transaction():
            self.conn.execute("SET LOCAL enable_indexscan = off")
            statement = self._query(where)
            for i in which:
                rows = self.conn.execute(statement, {"q": matrix[i], "k": k}, prepare=False).fetchall()
                results[i] = [SearchHit(r[0], float(r[1]), *r[2:]) for r in rows]


def search(
    conn: psycopg.Connection,
    vectors: Any,
    k: int = 10,
    filters: Sequence[str | SearchFilter] = (),
    tables: TableNames = DEFAULT_TABLES,
) -> list[list[SearchHit]]:
    """One-off :meth:`Searcher.search`."""
    return Searcher(conn, tables).search(vectors, k, filters)


def stored_vector(
    conn: psycopg.Connection, row_id: str, tables: TableNames = DEFAULT_TABLES
) -> npt.NDArray[np.float32]:
    """The vector stored for ``row_id`` (``search --like``)."""
    register_vector(conn)
    try:
        row = conn.execute(
            sql.SQL("SELECT vector FROM {} WHERE id = %s::uuid").format(sql.Identifier(tables.embedding)), (row_id,)
        ).fetchone()
    except psycopg.errors.InvalidTextRepresentation:
        raise SearchError(f"--like {row_id!r} is not a UUID") from None
    if row is None:
        raise SearchError(f"no stored row has id {row_id}")
    value = row[0]
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)
