"""The recall gate: after a load that built or changed the ANN index, tune its search setting.

Invariant: the setting stored in ``embedding_search_settings`` (which every search applies,
storage/search.py) is the smallest ``ivfflat.probes`` or ``hnsw.ef_search`` whose top-10 matched
exact search on at least ``min_recall`` of a sample (the one-sided 95 % lower bound of the
sample's mean recall@10, so that new queries reach it too), measured on the rows as they are now; when
no candidate reaches it, the best one measured is stored and the report says ``reached = False``.

Queries are new points in the neighbourhoods of random stored rows (a stored row would find
itself and, in HNSW, its own links: measured, that overstates recall). Exact answers come from one
sequential read of the table per step, distances computed client-side for every query at once
(:func:`exact_top`): one scan instead of one per query, which at 141,897 rows was most of the
gate's time. Each read is narrowed where that pays: every query gets an upper bound on the
distance of its k-th nearest row from k rows already read (a small random subset of the table
for the first step, the sampled rows' neighbours for the second), and PostgreSQL returns only
the rows some bound admits, with a margin for its float32 distances (:func:`_admitting`); the
answers are the same, and at 1M rows each read streams a few thousand rows, not the table. The
steps and the subset share one snapshot, so every bound is made of rows the reads see. The
queries and their answers (:class:`RecallSample`) need no ANN index, so they can be taken while
it builds. The ANN answers use the same SQL a search runs, with ``enable_seqscan = off`` so
that the planner cannot answer a high setting by an exact scan, and unprepared, so that no cached
plan outlives the setting it was made under.

Settings are tried cheaply: a candidate is given up as soon as, after at least
:data:`SCREEN_QUERIES` queries, even the upper 95 % bound of its recall is below the target, and for ivfflat, whose recall cannot
fall as ``probes`` grows (more lists probed is a superset of candidates), the smallest passing
setting is found from the candidate nearest ``sqrt(lists)`` (pgvector's advice): up by strides
that double while they miss, then bisection, so that the costly high settings are measured only
when the cheaper ones miss. Neither can choose a setting that did not pass on every query of
the sample; at worst they choose a larger one.

PostgreSQL answers each query on one core: given more connections, a setting's queries are dealt
out over them, one thread a connection, each in its own transaction under the setting. The
answers are put back in the sample's order and the early stop is decided on the longest run of
answered queries from the first, so the report is the one a single connection gives, in less
of the time between the index build and a queryable table.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
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
#: Queries a candidate setting is measured with before it may be given up: from then on, a
#: candidate whose recall's upper 95 % bound is below the target is not measured further.
SCREEN_QUERIES = 10
#: Rows a step of :func:`exact_top` holds in memory at once.
_SCAN_ROWS = 8192
#: Candidates a query keeps from each block of :func:`exact_top` beyond its ``k``, for the float64
#: re-rank: a margin for float32 rounding that also keeps the check in :func:`_pre_rank` from
#: firing on all but near-ties.
_PRE_RANK_EXTRA = 32
#: The most queries a read is narrowed for: PostgreSQL tests a row against each query's bound in
#: turn (about 60 ns a query at 384-d), while a row streamed out and pre-ranked costs about 6.8 us
#: (bench/RESULTS.md, "The recall sample"); past about 100 queries the whole read is as cheap.
_NARROW_MAX_QUERIES = 100
#: The share of the subset the bounds may admit for a narrowed read: above it, so would the read.
_NARROW_MAX_ADMITTED = 0.5
#: Bounds at or above this are not narrowed: a float32 squared distance past 3.4e38 is infinite
#: in pgvector, and would leave out a row that belongs.
_NARROW_MAX_BOUND = 1e18
_EVERY_ROW = sql.SQL("")


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


def _upper_bound(hits: Sequence[float]) -> float:
    """The one-sided 95 % upper confidence bound of the mean of ``hits`` (the mean for one)."""
    mean = float(np.mean(hits))
    return mean + 1.645 * float(np.std(hits, ddof=1)) / np.sqrt(len(hits)) if len(hits) > 1 else mean


def _stored_rows(
    conn: psycopg.Connection, tables: TableNames, width: int, where: sql.Composable = _EVERY_ROW
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The ids (16-byte keys) and vectors of the table's rows, ``where`` (a clause) narrowing them,
    in blocks of about :data:`_SCAN_ROWS` rows, read by one ``COPY ... TO STDOUT (FORMAT BINARY)``:
    every row has the same layout (a uuid and a vector of ``width``), so a block is parsed by numpy
    at once rather than by a loader a row."""
    row = np.dtype(
        [("fields", ">i2"), ("id_len", ">i4"), ("id", "V16"), ("vector_len", ">i4"), ("dim", ">i2"),
         ("unused", ">i2"), ("vector", ">f4", (width,))]
    )  # fmt: skip
    statement = sql.SQL("COPY (SELECT id, vector FROM {} {}) TO STDOUT (FORMAT BINARY)").format(
        tables.identifiers()["embedding"], where
    )
    buffer = bytearray()
    header = 19  # signature (11), flags (4), header extension length (4): always 0 from PostgreSQL
    with conn.cursor() as cur, cur.copy(statement) as copy:
        for data in copy:
            buffer += data
            whole = (len(buffer) - header) // row.itemsize if len(buffer) > header else 0
            if whole >= _SCAN_ROWS:
                yield _parse_rows(buffer, header, whole, row, width)
                del buffer[: header + whole * row.itemsize]
                header = 0
        whole = (len(buffer) - header - 2) // row.itemsize  # the trailer: a field count of -1
        if whole > 0:
            yield _parse_rows(buffer, header, whole, row, width)


def _parse_rows(buffer: bytearray, offset: int, count: int, row: np.dtype, width: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.frombuffer(buffer, dtype=row, count=count, offset=offset)
    if not (
        (rows["fields"] == 2).all()
        and (rows["id_len"] == 16).all()
        and (rows["vector_len"] == 4 + 4 * width).all()
        and (rows["dim"] == width).all()
    ):
        raise ValueError(f"the embedding table's COPY rows are not (uuid, vector({width})): cannot compute recall")
    return rows["id"].copy(), rows["vector"].astype(np.float32)


def exact_top(
    conn: psycopg.Connection,
    tables: TableNames,
    queries: np.ndarray,
    k: int,
    *,
    vectors: bool = False,
    within: np.ndarray | None = None,
) -> list[tuple[list[str], np.ndarray]]:
    """Each query's ``k`` nearest stored rows by L2 distance, nearest first, with their vectors
    (empty unless ``vectors``): exact search for every query in one sequential read of the table.

    Each block of rows is ranked first in float32 (one matrix product, the cost of the scan), and
    only its :data:`_PRE_RANK_EXTRA` + ``k`` best a query are ranked again by their float64
    distances, which decide. A block where float32 rounding could have left a true top-``k`` row
    out of those (its bound, :func:`_rounding_bound`, exceeds the gap the pre-rank left) is ranked
    in float64 whole for that query, so the order is exact up to ties either way; memory stays at
    :data:`_SCAN_ROWS` rows plus ``k`` candidates a query.

    :param within: for each query, an upper bound on the distance of its ``k``-th nearest row, from
        ``k`` distinct rows the read sees (:func:`narrowing`): the read is then of the rows some
        bound admits (:func:`_admitting`), which hold every answer.
    """
    q64 = np.asarray(queries, dtype=np.float64)
    q32 = q64.astype(np.float32)
    width = q64.shape[1]
    best_d = np.empty((len(q64), 0))
    best_keys = np.empty((len(q64), 0), dtype="V16")
    best_v = np.empty((len(q64), 0, width if vectors else 0), dtype=np.float32)
    where = _EVERY_ROW if within is None else _admitting(q32, within)
    for keys, stored in _stored_rows(conn, tables, width, where):
        picked = _pre_rank(q32, q64, stored, k + _PRE_RANK_EXTRA)
        near = stored[picked]  # (queries, candidates, width)
        pool_d = np.concatenate([best_d, ((near.astype(np.float64) - q64[:, None, :]) ** 2).sum(axis=2)], axis=1)
        order = np.argsort(pool_d, axis=1, kind="stable")[:, :k]
        best_d = np.take_along_axis(pool_d, order, axis=1)
        best_keys = np.take_along_axis(np.concatenate([best_keys, keys[picked]], axis=1), order, axis=1)
        if vectors:
            pool_v = np.concatenate([best_v, near], axis=1)
            best_v = np.take_along_axis(pool_v, order[:, :, None], axis=1)
    return [([str(uuid.UUID(bytes=bytes(key))) for key in best_keys[i]], best_v[i]) for i in range(len(q64))]


def _rounding_bound(q32: np.ndarray, x_norms: np.ndarray) -> np.ndarray:
    """A bound, a query, on how far a float32 ``|x|^2 - 2 q.x`` can be from its exact value for
    any row of the block: a dot product of ``n`` terms errs by at most ``n u |q| |x|`` (u = 2^-24),
    whatever the summation order; doubled for the subtraction and the norms' own rounding."""
    n = q32.shape[1] + 2
    unit = float(np.finfo(np.float32).eps) / 2
    x_max = float(np.sqrt(max(float(x_norms.max()), 0.0)))
    q_norm = np.sqrt((q32.astype(np.float64) ** 2).sum(axis=1))
    return 2.0 * n * unit * (x_max * x_max + 2.0 * q_norm * x_max)


def _pre_rank(q32: np.ndarray, q64: np.ndarray, stored: np.ndarray, take: int) -> np.ndarray:
    """Positions in ``stored`` of each query's ``take`` nearest rows by float32 distance: a set
    that holds the query's true nearest ``take - _PRE_RANK_EXTRA`` (checked; where rounding could
    have changed which rows those are, that query's positions come from float64 distances)."""
    rows = len(stored)
    if rows <= take:
        return np.broadcast_to(np.arange(rows), (len(q32), rows))
    x_norms = np.einsum("ij,ij->i", stored, stored)
    d32 = x_norms[None, :] - 2.0 * (q32 @ stored.T)  # |q|^2 left out: the same for every row
    picked = np.argpartition(d32, take - 1, axis=1)[:, :take]
    # A row left out has a float32 distance at least the take-th's; it could still belong to the
    # true top-k only if the k-th and the take-th are closer than twice the rounding bound.
    kept = np.take_along_axis(d32, picked, axis=1)
    kth = np.partition(kept, take - _PRE_RANK_EXTRA - 1, axis=1)[:, take - _PRE_RANK_EXTRA - 1]
    unsure = np.flatnonzero(kept.max(axis=1) - kth <= 2.0 * _rounding_bound(q32, x_norms))
    if len(unsure):
        x = stored.astype(np.float64)
        d64 = (x * x).sum(axis=1)[None, :] - 2.0 * (q64[unsure] @ x.T)
        picked[unsure] = np.argpartition(d64, take - 1, axis=1)[:, :take]
    return picked


def _admitting(q32: np.ndarray, within: np.ndarray) -> sql.Composed:
    """A ``WHERE`` clause that keeps every row within some query's bound by exact distance.

    pgvector computes ``<->`` in float32: each of the ``n`` squared differences errs by at most
    3u and their sum by (n - 1)u more (u = 2^-24, any summation order, the terms being
    non-negative), so its distance is at most ``(n + 2) u / 2`` above the exact one; the margin
    is twice that, for the second-order terms."""
    margin = 1.0 + (q32.shape[1] + 2) * float(np.finfo(np.float32).eps) / 2
    arms = [
        sql.SQL("vector <-> {}::vector <= {}").format(
            sql.Literal("[" + ",".join(repr(float(x)) for x in query) + "]"), sql.Literal(float(bound) * margin)
        )
        for query, bound in zip(q32, within, strict=True)
    ]
    return sql.SQL("WHERE ") + sql.SQL(" OR ").join(arms)


def _expanded(q: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``|x|^2 - 2 q.x`` for every query and row (float64): the squared distance less ``|q|^2``,
    one matrix product; cheap to rank by, but it loses digits where ``|x|`` dwarfs the distance."""
    return (rows * rows).sum(axis=1)[None, :] - 2.0 * (q @ rows.T)


def _kth_distance(queries: np.ndarray, keys: np.ndarray, stored: np.ndarray, k: int) -> np.ndarray:
    """Each query's float64 distance to its ``k``-th nearest of the distinct rows ``keys`` (the
    first of a key repeated counts once), ``inf`` where there are fewer than ``k``: an upper
    bound on the distance of its ``k``-th nearest stored row."""
    _, first = np.unique(keys, return_index=True)
    rows = np.asarray(stored, dtype=np.float64)[np.sort(first)]
    if len(rows) < k:
        return np.full(len(queries), np.inf)
    q = np.asarray(queries, dtype=np.float64)
    # Ranked by the expanded form, one matrix product; the k nearest measured again directly.
    nearest = np.argpartition(_expanded(q, rows), k - 1, axis=1)[:, : min(len(rows), k + _PRE_RANK_EXTRA)]
    exact = np.sqrt(((rows[nearest] - q[:, None, :]) ** 2).sum(axis=2))
    return np.sort(exact, axis=1)[:, k - 1]


def narrowing(queries: np.ndarray, within: np.ndarray, subset: np.ndarray) -> np.ndarray | None:
    """``within`` when a read narrowed by it (:func:`_admitting`) is worth it, else ``None`` (read
    everything): at most :data:`_NARROW_MAX_QUERIES` queries, finite bounds below
    :data:`_NARROW_MAX_BOUND`, and at most :data:`_NARROW_MAX_ADMITTED` of ``subset`` (a random
    part of the table) admitted, as it estimates the share of the table the read would stream."""
    if len(queries) > _NARROW_MAX_QUERIES or len(subset) == 0 or not np.all(within < _NARROW_MAX_BOUND):
        return None
    q = np.asarray(queries, dtype=np.float64)
    distances = np.sqrt(
        np.maximum(_expanded(q, np.asarray(subset, dtype=np.float64)) + (q * q).sum(axis=1)[:, None], 0.0)
    )
    admitted = float((distances <= np.asarray(within)[:, None] * (1 + 1e-6)).any(axis=0).mean())
    return np.asarray(within, dtype=np.float64) if admitted <= _NARROW_MAX_ADMITTED else None


def _subset_rows(count: int, queries: int, k: int) -> int:
    """The subset a first read's bounds come from: ``sqrt(queries * k * count)`` rows, where the
    subset's own rows and those its bounds admit (about ``queries * k * count / subset``) cost the
    least together."""
    return math.isqrt(queries * k * count)


def _subset(
    conn: psycopg.Connection, tables: TableNames, width: int, rows: int, count: int, seed: float
) -> tuple[np.ndarray, np.ndarray]:
    """About ``rows`` of the table's ``count`` rows, whole pages at random (``TABLESAMPLE SYSTEM``,
    repeatable by ``seed``): ids (16-byte keys) and vectors."""
    percent = min(100.0, 100.0 * rows / max(count, 1))
    where = sql.SQL("TABLESAMPLE SYSTEM ({}) REPEATABLE ({})").format(sql.Literal(percent), sql.Literal(seed))
    blocks = list(_stored_rows(conn, tables, width, where))
    if not blocks:
        return np.empty(0, dtype="V16"), np.empty((0, width), dtype=np.float32)
    return np.concatenate([keys for keys, _ in blocks]), np.concatenate([stored for _, stored in blocks])


@dataclass(frozen=True)
class RecallSample:
    """The gate's queries and their exact top-10 (ids), on the table as it was read: what every
    candidate setting is measured against. Taking it needs no ANN index, so finalize takes it while
    the index builds (operators/embedding_stream.py)."""

    queries: tuple[np.ndarray, ...]
    truth: tuple[frozenset[str], ...]
    rows_indexed: int


def recall_sample(
    conn: psycopg.Connection,
    tables: TableNames = DEFAULT_TABLES,
    *,
    queries: int = DEFAULT_RECALL_QUERIES,
    seed: float = 0.5,
) -> RecallSample | None:
    """``queries`` new points in the neighbourhoods of random stored rows, and their exact top-10
    (module docstring); ``None`` for an empty table. ``conn`` is autocommit."""
    register_vector(conn)
    ids = tables.identifiers()
    # One snapshot for the sample, the subset and both reads: a bound is made of rows the reads see.
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        conn.execute("SELECT setseed(%s)", (seed,))
        sample = conn.execute(
            sql.SQL("SELECT id, vector FROM {} ORDER BY random() LIMIT %s").format(ids["embedding"]), (queries,)
        ).fetchall()
        if not sample:
            return None
        found = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ids["embedding"])).fetchone()
        count = int(found[0]) if found else 0
        # A stored row is a node of the HNSW graph linked to its own neighbours (and sits in the
        # ivfflat list of its neighbours), so it finds them more easily than a new vector does. The
        # queries are new points of the sampled rows' neighbourhoods instead: the mean of a row's 11
        # nearest rows plus a random offset as long as the row's own distance from that mean.
        rows = np.stack([_array(vector) for _, vector in sample])
        keys = np.array([row_id.bytes for row_id, _ in sample], dtype="V16")
        size = _subset_rows(count, len(rows), RECALL_K + 1)
        subset_keys, subset = (
            _subset(conn, tables, rows.shape[1], size, count, seed) if size < count else (keys[:0], rows[:0])
        )
        pool_keys, pool = np.concatenate([keys, subset_keys]), np.concatenate([rows, subset])
        within = narrowing(rows, _kth_distance(rows, pool_keys, pool, RECALL_K + 1), subset)
        near = exact_top(conn, tables, rows, RECALL_K + 1, vectors=True, within=within)
        rng = np.random.default_rng(int(seed * 2**31))
        made = []
        for row, (_, neighbours) in zip(rows, near, strict=True):
            centre = neighbours.mean(axis=0)
            direction = rng.standard_normal(centre.shape).astype(np.float32)
            direction /= np.linalg.norm(direction)
            made.append((centre + direction * np.linalg.norm(row - centre)).astype(np.float32))
        # Each query's 10th nearest of its row's 11 neighbours bounds its 10th nearest stored row.
        bounds = np.concatenate(
            [
                _kth_distance(
                    query[None, :], np.array([uuid.UUID(f).bytes for f in found], dtype="V16"), vectors, RECALL_K
                )
                for query, (found, vectors) in zip(made, near, strict=True)
            ]
        )
        queried = np.stack(made)
        answers = exact_top(conn, tables, queried, RECALL_K, within=narrowing(queried, bounds, subset))
    truth = tuple(frozenset(found) for found, _ in answers)
    return RecallSample(queries=tuple(made), truth=truth, rows_indexed=count)


class _Answers:
    """One setting's answers to the sample, in its order, as the connections report them.

    :attr:`done` is the length of the run of answered queries from the first; the early stop rule
    is applied to each such run as it grows, exactly as one connection applies it after each
    query, so the queries kept (:meth:`kept`) are those one connection would have asked."""

    def __init__(self, truth: Sequence[frozenset[str]], min_recall: float) -> None:
        self.truth = truth
        self.min_recall = min_recall
        self.hits: list[float | None] = [None] * len(truth)
        self.seconds: list[float] = [0.0] * len(truth)
        self.done = 0
        self.cut = len(truth)  # the queries kept: all, unless the early stop fires
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """The next query to ask, or ``None`` when every one is taken or the measurement stopped."""
        with self._lock:
            if self.stop.is_set() or self._next >= self.cut:
                return None
            self._next += 1
            return self._next - 1

    def answer(self, index: int, found: Sequence[str], elapsed: float) -> None:
        exact = self.truth[index]
        with self._lock:
            self.hits[index] = len(exact.intersection(found)) / max(1, len(exact))
            self.seconds[index] = elapsed
            while self.done < self.cut and self.hits[self.done] is not None:
                self.done += 1
                if SCREEN_QUERIES <= self.done < len(self.truth) and _upper_bound(self.kept()) < self.min_recall:
                    # Short of the target even by its upper bound: spend the queries on a larger setting.
                    self.cut = self.done
                    self.stop.set()

    def fail(self, exc: BaseException) -> bool:
        """Record ``exc`` and stop every connection; ``True`` for the first failure."""
        with self._lock:
            first = self.error is None
            if first:
                self.error = exc
            self.stop.set()
        return first

    def kept(self) -> list[float]:
        return [hit for hit in self.hits[: self.done] if hit is not None]


def _ask(
    conn: psycopg.Connection,
    everyone: Sequence[psycopg.Connection],
    answers: _Answers,
    statement: sql.Composed,
    queries: Sequence[np.ndarray],
    name: str,
    value: int,
) -> None:
    """Answer queries taken from ``answers`` on ``conn``, in one transaction under the setting,
    until none is left; a failure stops the others (their running query cancelled) and is kept."""
    try:
        with conn.transaction():
            apply_setting(conn, name, value)
            # Measure the index itself: at a high setting the planner may pick an exact scan instead,
            # which would report the recall of exact search, not of the setting.
            conn.execute("SET LOCAL enable_seqscan = off")
            while (index := answers.take()) is not None:
                found, elapsed = _top(conn, statement, queries[index])
                answers.answer(index, found, elapsed)
    except BaseException as exc:
        if answers.fail(exc):
            # cancel_safe only sends a request over a socket of its own, meant for a thread other
            # than the one running the query; PostgreSQL ignores it on a connection that runs nothing.
            for other in everyone:
                if other is not conn and not other.closed:
                    try:
                        other.cancel_safe(timeout=5)
                    except psycopg.Error:
                        log.debug("could not cancel a recall query beside a failed one", exc_info=True)


def _measure(
    conns: Sequence[psycopg.Connection],
    statement: sql.Composed,
    sample: RecallSample,
    name: str,
    value: int,
    min_recall: float,
) -> tuple[list[float], list[float]]:
    """Each kept query's hit rate and seconds, in the sample's order (see :class:`_Answers`):
    ``conns[0]`` answers in the calling thread, each other connection in a thread of its own."""
    answers = _Answers(sample.truth, min_recall)
    threads = [
        threading.Thread(
            target=_ask,
            args=(side, conns, answers, statement, sample.queries, name, value),
            name=f"recall-gate-{number}",
            daemon=True,
        )
        for number, side in enumerate(conns[1:], start=1)
    ]
    try:
        for thread in threads:
            thread.start()
        _ask(conns[0], conns, answers, statement, sample.queries, name, value)
    finally:
        answers.stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join()
    if answers.error is not None:
        raise answers.error
    return answers.kept(), answers.seconds[: answers.done]


def tune_search(
    conn: psycopg.Connection,
    tables: TableNames = DEFAULT_TABLES,
    *,
    min_recall: float = DEFAULT_MIN_RECALL,
    queries: int = DEFAULT_RECALL_QUERIES,
    seed: float = 0.5,
    values: Sequence[int] | None = None,
    sample: RecallSample | None = None,
    side: Sequence[psycopg.Connection] = (),
) -> RecallReport | None:
    """Measure recall@10 of candidate settings (see the module's docstring for which); store and
    return the smallest that reached ``min_recall``, else the best one measured.

    ``None`` when the table has no ANN index managed by this package.

    :param conn: autocommit; reads the index, answers queries, stores the choice.
    :param tables: the provider's table names.
    :param min_recall: the target of the sample's recall@10 (its one-sided 95 % lower bound).
    :param queries: the sample's size when it is taken here.
    :param seed: the sample's seed when it is taken here.
    :param values: the candidate settings, instead of :func:`candidates`.
    :param sample: the queries and their exact answers, else taken here (:func:`recall_sample`).
    :param side: more autocommit connections to the same database, each idle and used by no other
        thread while this runs: a setting's queries are dealt out over ``conn`` and these at once
        (module docstring), with the same report but its latencies, which are then of queries
        answered side by side (as a loaded server answers them). A query that fails on any of them
        fails the measurement with its error, after the others stopped.
    """
    if not 0 < float(min_recall) <= 1:
        raise ValueError(f"min_recall must be in (0, 1], got {min_recall}")
    method = ann_index_method(conn, tables)
    if method is None:
        return None
    register_vector(conn)
    sample = sample or recall_sample(conn, tables, queries=queries, seed=seed)
    if sample is None:
        return None
    conns = [conn, *side]
    for other in side:
        register_vector(other)
    ids = tables.identifiers()
    truth = sample.truth
    statement = sql.SQL("SELECT id::text FROM {} ORDER BY vector <-> %(q)s LIMIT %(k)s").format(ids["embedding"])
    name, _ = SEARCH_SETTINGS[method]
    tried: dict[int, float] = {}
    measured: dict[int, tuple[float, list[float]]] = {}

    def measure(value: int) -> float:
        """The candidate's lower bound (below ``min_recall`` when given up early); fills ``tried`` and ``measured``."""
        hits, seconds = _measure(conns, statement, sample, name, value, float(min_recall))
        recall = float(np.mean(hits))
        tried[value] = round(recall, 4)
        # The sample's mean is an estimate: the setting must reach the target with its one-sided
        # 95 % lower confidence bound, or fresh queries land below it about half the time.
        bound = 2 * recall - _upper_bound(hits)
        if len(hits) < len(truth):  # stopped early: it did not pass
            bound = min(bound, recall)
        measured[value] = (bound, seconds)
        return bound

    order = list(values or candidates(conn, tables, method))
    if method == "ivfflat":
        # Recall cannot fall as probes grow, and a setting costs about what it probes (a query reads
        # probes/lists of the table). First the candidate nearest sqrt(lists), where pgvector's
        # README starts; when it misses, up by doubling strides; then bisect below the first pass.
        # Bisecting from the middle of the upper half instead, a miss at 30 of 1000 lists went on to
        # measure 160, 80 and 50 in full before 40: 13.9 s of a 79.5 s finalize (bench/RESULTS.md).
        root = math.sqrt(ivfflat_lists(conn, tables))
        start = min(range(len(order)), key=lambda i: abs(order[i] - root))
        # Below lo every candidate missed (or is left to the bisection); order[hi] passed.
        if measure(order[start]) >= min_recall:
            lo, hi = 0, start
        else:
            lo, hi, stride = start + 1, len(order), 1
            while lo < hi:
                step = min(lo + stride, hi) - 1
                if measure(order[step]) >= min_recall:
                    hi = step
                    break
                lo, stride = step + 1, 2 * stride
        while lo < hi:
            middle = (lo + hi) // 2
            if measure(order[middle]) >= min_recall:
                hi = middle
            else:
                lo = middle + 1
    else:
        for value in order:
            if measure(value) >= min_recall:
                break
    passing = [v for v in measured if measured[v][0] >= min_recall]
    value = min(passing) if passing else max(measured, key=lambda v: measured[v][0])
    bound, seconds = measured[value]
    tried = dict(sorted(tried.items()))
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
        queries=len(truth),
        rows_indexed=sample.rows_indexed,
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
