"""The recall gate: after a load that built or changed the ANN index, tune its search setting.

Invariant: the setting stored in ``embedding_search_settings`` (which every search applies,
storage/search.py) is the smallest ``ivfflat.probes`` or ``hnsw.ef_search`` whose top-10 matched
exact search on at least ``min_recall`` of a sample (the one-sided 95 % lower bound of the
sample's mean recall@10, so that new queries reach it too), measured on the rows as they are now; when
no candidate reaches it, the best one measured is stored and the report says ``reached = False``.

Queries are new points in the neighbourhoods of random stored rows (a stored row would find
itself and, in HNSW, its own links: measured, that overstates recall). Exact answers come from the same SQL
with ``SET LOCAL enable_indexscan = off`` in their own transaction; the ANN answers with
``enable_seqscan = off``, so that the planner cannot answer a high setting by an exact scan, and
unprepared, so that no cached plan outlives the setting it was made under.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, TableNames, ann_index_method, ivfflat_lists
from airflow_embedding_provider.storage.search import SEARCH_SETTINGS, apply_setting

log = logging.getLogger(__name__)

DEFAULT_MIN_RECALL = 0.95
DEFAULT_RECALL_QUERIES = 50
RECALL_K = 10
_IVFFLAT_PROBES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 65, 80, 100, 130, 160, 200, 260, 320, 400)
_HNSW_EF_SEARCH = (20, 30, 40, 60, 80, 100, 150, 200, 300, 400, 600, 800, 1000)


@dataclass(frozen=True)
class RecallReport:
    """What the gate measured and chose; ``as_dict()`` goes to finalize's XCom."""

    method: str
    setting: str
    value: int
    recall_at_10: float
    recall_lower_bound: float
    min_recall: float
    reached: bool
    queries: int
    rows_indexed: int
    latency_ms_p50: float
    latency_ms_p95: float
    tried: dict[int, float] = field(default_factory=dict)
    database_default: bool = False

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tried"] = {str(key): value for key, value in self.tried.items()}
        return out


def candidates(conn: psycopg.Connection, tables: TableNames, method: str) -> list[int]:
    if method == "hnsw":
        return list(_HNSW_EF_SEARCH)
    lists = ivfflat_lists(conn, tables)
    return sorted({p for p in _IVFFLAT_PROBES if p < lists} | {lists})  # probes = lists is exact


def _array(value: Any) -> np.ndarray:
    return np.asarray(value.to_numpy() if hasattr(value, "to_numpy") else value, dtype=np.float32)


def _top(conn: psycopg.Connection, statement: sql.Composed, query: Any) -> tuple[list[str], float]:
    began = time.perf_counter()
    # prepare=False: a prepared statement's generic plan outlives the SET LOCAL it was planned under.
    rows = conn.execute(statement, {"q": query, "k": RECALL_K}, prepare=False).fetchall()
    elapsed = time.perf_counter() - began
    return [r[0] for r in rows], elapsed


def tune_search(
    conn: psycopg.Connection,
    tables: TableNames = DEFAULT_TABLES,
    *,
    min_recall: float = DEFAULT_MIN_RECALL,
    queries: int = DEFAULT_RECALL_QUERIES,
    seed: float = 0.5,
    values: Sequence[int] | None = None,
) -> RecallReport | None:
    """Measure recall@10 per candidate setting, smallest first; store and return the choice.

    ``None`` when the table has no ANN index managed by this package. ``conn`` is autocommit.
    ``values`` replaces the candidate settings (:func:`candidates`).
    """
    if not 0 < float(min_recall) <= 1:
        raise ValueError(f"min_recall must be in (0, 1], got {min_recall}")
    method = ann_index_method(conn, tables)
    if method is None:
        return None
    register_vector(conn)
    ids = tables.identifiers()
    with conn.transaction():
        conn.execute("SELECT setseed(%s)", (seed,))
        sample = conn.execute(
            sql.SQL("SELECT id::text, vector FROM {} ORDER BY random() LIMIT %s").format(ids["embedding"]), (queries,)
        ).fetchall()
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ids["embedding"])).fetchone()
    rows_indexed = int(count[0]) if count else 0
    if not sample:
        return None
    statement = sql.SQL("SELECT id::text, vector FROM {} ORDER BY vector <-> %(q)s LIMIT %(k)s").format(
        ids["embedding"]
    )
    with conn.transaction():
        conn.execute("SET LOCAL enable_indexscan = off")
        # A stored row is a node of the HNSW graph linked to its own neighbours (and sits in the
        # ivfflat list of its neighbours), so it finds them more easily than a new vector does. The
        # queries are new points of the sampled rows' neighbourhoods instead: the mean of a row's 11
        # nearest rows plus a random offset as long as the row's own distance from that mean.
        rng = np.random.default_rng(int(seed * 2**31))
        queries_used = []
        for _, vector in sample:
            near = np.stack(
                [_array(v) for _, v in conn.execute(statement, {"q": vector, "k": RECALL_K + 1}, prepare=False)]
            )
            centre = near.mean(axis=0)
            direction = rng.standard_normal(centre.shape).astype(np.float32)
            direction /= np.linalg.norm(direction)
            queries_used.append(centre + direction * np.linalg.norm(_array(vector) - centre))
        truth = [set(_top(conn, statement, query)[0]) for query in queries_used]
    name, _ = SEARCH_SETTINGS[method]
    tried: dict[int, float] = {}
    best: tuple[float, int, list[float]] = (-1.0, 0, [])
    for value in values or candidates(conn, tables, method):
        with conn.transaction():
            apply_setting(conn, name, value)
            # Measure the index itself: at a high setting the planner may pick an exact scan instead,
            # which would report the recall of exact search, not of the setting.
            conn.execute("SET LOCAL enable_seqscan = off")
            hits, seconds = [], []
            for query, exact in zip(queries_used, truth, strict=True):
                found, elapsed = _top(conn, statement, query)
                hits.append(len(exact.intersection(found)) / max(1, len(exact)))
                seconds.append(elapsed)
        recall = float(np.mean(hits))
        tried[value] = round(recall, 4)
        # The sample's mean is an estimate: the setting must reach the target with its one-sided
        # 95 % lower confidence bound, or fresh queries land below it about half the time.
        bound = recall - 1.645 * float(np.std(hits, ddof=1)) / np.sqrt(len(hits)) if len(hits) > 1 else recall
        if bound > best[0]:
            best = (bound, value, seconds)
        if bound >= min_recall:
            best = (bound, value, seconds)
            break
    bound, value, seconds = best
    recall = tried[value]
    p50, p95 = (float(np.percentile(seconds, q)) * 1000 for q in (50, 95))
    report = RecallReport(
        method=method,
        setting=name,
        value=value,
        recall_at_10=round(recall, 4),
        recall_lower_bound=round(float(bound), 4),
        min_recall=float(min_recall),
        reached=bool(bound >= min_recall),
        queries=len(sample),
        rows_indexed=rows_indexed,
        latency_ms_p50=round(p50, 3),
        latency_ms_p95=round(p95, 3),
        tried=tried,
    )
    save_setting(conn, tables, report)
    return RecallReport(**{**asdict(report), "database_default": set_database_default(conn, name, value)})


def save_setting(conn: psycopg.Connection, tables: TableNames, report: RecallReport) -> None:
    """Upsert the choice where every search of the provider reads it (storage/search.py)."""
    conn.execute(
        sql.SQL(
            "INSERT INTO {} (embedding_table, method, setting, value, recall_at_10, min_recall, rows_indexed, measured_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, NOW()) ON CONFLICT (embedding_table) DO UPDATE SET "
            "method = EXCLUDED.method, setting = EXCLUDED.setting, value = EXCLUDED.value, "
            "recall_at_10 = EXCLUDED.recall_at_10, min_recall = EXCLUDED.min_recall, "
            "rows_indexed = EXCLUDED.rows_indexed, measured_at = EXCLUDED.measured_at"
        ).format(sql.Identifier(tables.search_settings)),
        (
            tables.embedding,
            report.method,
            report.setting,
            report.value,
            report.recall_at_10,
            report.min_recall,
            report.rows_indexed,
        ),
    )


def set_database_default(conn: psycopg.Connection, name: str, value: int) -> bool:
    """``ALTER DATABASE <current> SET name = value``, so that new sessions of users' own SQL search
    with it too. Needs the database's owner (or superuser): without, logs what to run and returns False."""
    dbname = conn.info.dbname
    statement = sql.SQL("ALTER DATABASE {} SET {} = {}").format(
        sql.Identifier(dbname), sql.SQL(name), sql.Literal(str(value))
    )
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege:
        log.warning(
            "cannot set the database default (not its owner): the provider's searches use %s = %d from the "
            "settings table; for other SQL run as the owner: %s",
            name,
            value,
            statement.as_string(conn),
        )
        return False
    return True
