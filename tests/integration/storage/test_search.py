"""Search and the recall gate against a real PostgreSQL with pgvector 0.8, on clustered vectors."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict

import numpy as np
import pandas as pd
import psycopg
import pytest
from pgvector.psycopg import register_vector
from psycopg import sql

from airflow_embedding_provider.hooks.postgres import PgvectorSearchHook
from airflow_embedding_provider.operators.embedding_stream import recall_failure
from airflow_embedding_provider.storage import recall
from airflow_embedding_provider.storage.recall import (
    RecallReport,
    RecallSample,
    candidates,
    exact_top,
    recall_sample,
    tune_search,
)
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, apply_schema, ensure_ann_index, ivfflat_lists
from airflow_embedding_provider.storage.search import Searcher, SearchError, SearchFilter, read_search_setting
from dev.sample import make_sample

ROWS = 6000
DIMENSION = 32


def load_frame(conn: psycopg.Connection, frame: pd.DataFrame) -> None:
    register_vector(conn)
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(
            "COPY recruit_metadata (id, company_name, exp_years, english_level, primary_keyword) FROM STDIN"
        ) as copy:
            for row in frame.itertuples(index=False):
                copy.write_row((row[0], row[1], int(row[2]), row[3], row[4]))
        with cur.copy("COPY recruit_embedding (id, vector) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["uuid", "vector"])
            for row_id, vector in zip(frame["id"], frame["job_post_vectors"], strict=True):
                copy.write_row((uuid.UUID(row_id), np.asarray(vector, dtype=np.float32)))


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return make_sample(ROWS, dimension=DIMENSION, seed=3, clusters=60, layout="seed")


@pytest.fixture
def conn(pg_dsn: str, frame: pd.DataFrame) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg_dsn, autocommit=True) as opened:
        apply_schema(opened, DIMENSION)
        load_frame(opened, frame)
        assert ensure_ann_index(opened, DEFAULT_TABLES, "ivfflat")
        yield opened


def _exact(frame: pd.DataFrame, mask: np.ndarray, query: np.ndarray, k: int) -> list[str]:
    vectors = np.stack(list(frame["job_post_vectors"][mask])).astype(np.float32)
    order = np.argsort(((vectors - query) ** 2).sum(axis=1), kind="stable")[:k]
    return list(frame["id"][mask].to_numpy()[order])


def test_the_gate_picks_a_setting_every_search_then_uses(conn: psycopg.Connection) -> None:
    assert read_search_setting(conn) is not None and not read_search_setting(conn).tuned  # type: ignore[union-attr]
    report = tune_search(conn, min_recall=0.95, queries=40)
    assert report is not None and report.reached and report.recall_lower_bound >= 0.95
    assert report.recall_at_10 >= report.recall_lower_bound and report.tried[report.value] == report.recall_at_10
    # Bisection over the candidates: the one just below the choice was measured and missed.
    every = candidates(conn, DEFAULT_TABLES, "ivfflat")
    assert set(report.tried) <= set(every) and len(report.tried) < len(every)
    below = [v for v in every if v < report.value]
    if below:
        assert below[-1] in report.tried and report.tried[below[-1]] < report.recall_at_10
    setting = read_search_setting(conn)
    assert setting is not None and setting.tuned and (setting.name, setting.value) == ("ivfflat.probes", report.value)
    assert report.database_default  # the test database's owner may set it
    assert recall_failure(report.as_dict()) is None
    # The same choice as measuring every candidate in turn, smallest first.
    each = {v: tune_search(conn, min_recall=0.95, queries=40, values=[v]) for v in every}
    first = next(v for v in every if each[v] is not None and each[v].reached)  # type: ignore[union-attr]
    assert report.value == first


def test_the_gate_starts_near_the_root_of_the_lists_not_in_the_middle(conn: psycopg.Connection) -> None:
    # A setting costs what it probes. On these 6 lists the gate starts at 2 (sqrt 6 = 2.4) and
    # goes up by strides from there; from the middle of these 40 it would measure 20 first.
    values = list(range(1, 41))  # beyond the table's 6 lists every value probes them all
    report = tune_search(conn, min_recall=0.95, queries=40, values=values)
    assert report is not None and report.reached and 2 in report.tried
    assert max(report.tried) <= 6, report.tried  # 6 probes every list: exact, it passes
    below = [v for v in values if v < report.value]
    assert not below or (below[-1] in report.tried and report.tried[below[-1]] < report.recall_at_10)
    each = {v: tune_search(conn, min_recall=0.95, queries=40, values=[v]) for v in range(1, 7)}
    assert report.value == next(v for v in range(1, 7) if each[v] is not None and each[v].reached)  # type: ignore[union-attr]


def _measured(report: RecallReport | None) -> dict[str, object]:
    """What a report says of recall and the choice: everything but the latencies, which are timed."""
    assert report is not None
    return {k: v for k, v in asdict(report).items() if not k.startswith("latency_ms_")}


def _recall(conn: psycopg.Connection, sample: RecallSample, probes: int) -> float:
    """Mean recall@10 of ``sample`` at ``probes``, one query after another on ``conn``."""
    hits = []
    with conn.transaction():
        conn.execute("SELECT set_config('ivfflat.probes', %s, true)", (str(probes),))
        conn.execute("SET LOCAL enable_seqscan = off")
        for query, exact in zip(sample.queries, sample.truth, strict=True):
            rows = conn.execute(
                "SELECT id::text FROM recruit_embedding ORDER BY vector <-> %s LIMIT 10", (query,), prepare=False
            ).fetchall()
            hits.append(len(exact.intersection(r[0] for r in rows)) / len(exact))
    return float(np.mean(hits))


@pytest.mark.parametrize("sides", [1, 2])
def test_the_gate_over_more_connections_reports_what_one_connection_does(conn: psycopg.Connection, sides: int) -> None:
    # 100 lists of 60 rows: a probe or two miss the target by far, so such a setting is given up
    # after SCREEN_QUERIES queries; the bisection measures its settings on all 40.
    conn.execute("DROP INDEX recruit_embedding_ivfflat")
    conn.execute(
        "CREATE INDEX recruit_embedding_ivfflat ON recruit_embedding USING ivfflat (vector vector_l2_ops) WITH (lists = 100)"
    )
    sample = recall_sample(conn, queries=40)
    assert sample is not None
    with contextlib.ExitStack() as stack:
        side = [stack.enter_context(psycopg.connect(conn.info.dsn, autocommit=True)) for _ in range(sides)]
        for values in ([1, 2], None):
            one = tune_search(conn, min_recall=0.99, sample=sample, values=values)
            many = tune_search(conn, min_recall=0.99, sample=sample, values=values, side=side)
            # A query lost, answered twice, kept past the early stop or matched with another's
            # answer moves a setting's recall (4 decimals of 40 queries) or the bisection's path.
            assert _measured(many) == _measured(one)
            assert read_search_setting(conn).value == one.value  # type: ignore[union-attr]
        # And the recall of the choice (a pass: every query) is that of asking each query in turn here.
        assert many is not None and many.reached
        assert many.recall_at_10 == round(_recall(conn, sample, many.value), 4)
        assert all(s.info.transaction_status == psycopg.pq.TransactionStatus.IDLE for s in side)
    assert not [t for t in threading.enumerate() if t.name.startswith("recall-gate")]


def test_a_query_that_fails_on_a_side_connection_fails_the_gate_with_its_error(conn: psycopg.Connection) -> None:
    sample = recall_sample(conn, queries=40)
    role = f"no_read_{conn.info.backend_pid}"
    # A real refusal on the side connection alone: its role may not read the table. (A 1 ms
    # statement_timeout does not fail reliably: these queries can take less.)
    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
    try:
        with psycopg.connect(conn.info.dsn, autocommit=True) as side:
            side.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            with pytest.raises(
                psycopg.errors.InsufficientPrivilege, match="permission denied for table recruit_embedding"
            ):
                tune_search(conn, min_recall=0.95, sample=sample, side=[side])
            assert not [t for t in threading.enumerate() if t.name.startswith("recall-gate")]
            # Both connections are out of their measuring transactions and take the next statement.
            for each in (conn, side):
                assert each.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                assert each.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    # Nothing was stored: searches keep pgvector's default until a gate finishes.
    assert not read_search_setting(conn).tuned  # type: ignore[union-attr]


@pytest.mark.parametrize("scan_rows", [8192, 700], ids=["one-step", "many-steps"])
def test_the_gates_one_scan_exact_search_answers_as_numpy_does(
    conn: psycopg.Connection, frame: pd.DataFrame, scan_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recall, "_SCAN_ROWS", scan_rows)  # 700: the table is read in nine steps
    register_vector(conn)
    rng = np.random.default_rng(5)
    queries = rng.standard_normal((25, DIMENSION)).astype(np.float32)
    queries[:5] = np.stack(list(frame["job_post_vectors"][:5]))  # stored rows find themselves first
    everything = np.ones(len(frame), dtype=bool)
    answers = exact_top(conn, DEFAULT_TABLES, queries, 11, vectors=True)
    by_id = dict(zip(frame["id"], frame["job_post_vectors"], strict=True))
    for i, (found, vectors) in enumerate(answers):
        assert found == _exact(frame, everything, queries[i], 11)
        assert np.array_equal(vectors, np.stack([np.asarray(by_id[f], dtype=np.float32) for f in found]))
    assert [found[0] for found, _ in answers[:5]] == list(frame["id"][:5])


def test_the_float32_pre_rank_hands_near_ties_to_float64(conn: psycopg.Connection) -> None:
    # 100 rows at distances 0.001^2 .. 0.1^2 from a query of norm 1000: in float32 the pre-rank's
    # |x|^2 - 2 q.x is about -1e6 for all of them, with a resolution of 0.06, so it cannot tell
    # them apart; only the float64 path finds the 11 nearest.
    register_vector(conn)
    offsets = np.arange(1, 101, dtype=np.float32) * np.float32(0.001)
    np.random.default_rng(9).shuffle(offsets)
    ids = [str(uuid.UUID(int=0xA000 + i)) for i in range(len(offsets))]
    near = np.zeros((len(offsets), DIMENSION), dtype=np.float32)
    near[:, 0], near[:, 1] = 1000.0, offsets
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany("INSERT INTO recruit_metadata (id) VALUES (%s)", [(i,) for i in ids])
        cur.executemany("INSERT INTO recruit_embedding (id, vector) VALUES (%s, %s)", list(zip(ids, near, strict=True)))
    query = np.zeros((1, DIMENSION), dtype=np.float32)
    query[0, 0] = 1000.0
    [(found, _)] = exact_top(conn, DEFAULT_TABLES, query, 11)
    assert found == [ids[i] for i in np.argsort(offsets)[:11]]


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows each read of the recall sample streams, counted around the real reader."""
    counts: list[int] = []
    real = recall._stored_rows

    def counted(*args: object, **kwargs: object) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        counts.append(0)
        for keys, stored in real(*args, **kwargs):  # type: ignore[arg-type]
            counts[-1] += len(keys)
            yield keys, stored

    monkeypatch.setattr(recall, "_stored_rows", counted)
    return counts


def test_the_narrowed_sample_is_the_one_whole_table_reads_give(
    conn: psycopg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same seed, the reads narrowed by the bounds or of every row: the same queries (made from
    # the sampled rows' exact neighbours) and the same exact answers, from far fewer rows.
    reads = _counting_reads(monkeypatch)
    narrowed = recall_sample(conn, queries=40)
    subset, first, second = reads
    assert 0 < subset < ROWS and first < ROWS / 4 and second < ROWS / 4
    reads.clear()
    monkeypatch.setattr(recall, "narrowing", lambda *_: None)
    whole = recall_sample(conn, queries=40)
    assert reads[1:] == [ROWS, ROWS]
    assert narrowed is not None and whole is not None
    assert all(np.array_equal(a, b) for a, b in zip(narrowed.queries, whole.queries, strict=True))
    assert narrowed.truth == whole.truth and narrowed.rows_indexed == whole.rows_indexed == ROWS


def test_a_narrowed_read_keeps_the_row_at_the_bound_though_pgvector_rounds_its_distance_up(
    conn: psycopg.Connection, frame: pd.DataFrame
) -> None:
    # pgvector's float32 distance can exceed the exact one; a read narrowed to the exact 11th
    # distance must still return the 11th row. Queries are kept where the rounding goes up.
    register_vector(conn)
    stored = np.stack(list(frame["job_post_vectors"])).astype(np.float64)
    rng = np.random.default_rng(11)
    kept, bounds = [], []
    for _ in range(400):
        query = (stored[rng.integers(ROWS)] + rng.standard_normal(DIMENSION) * 0.05).astype(np.float32)
        exact = np.sqrt(((stored - query.astype(np.float64)) ** 2).sum(axis=1))
        eleventh = int(np.argsort(exact, kind="stable")[10])
        rounded = conn.execute(
            "SELECT vector <-> %s FROM recruit_embedding WHERE id = %s", (query, frame["id"][eleventh])
        ).fetchone()
        if rounded is not None and rounded[0] > exact[eleventh]:
            kept.append(query)
            bounds.append(exact[eleventh])
        if len(kept) == 10:
            break
    assert len(kept) == 10
    queries = np.stack(kept)
    narrowed = exact_top(conn, DEFAULT_TABLES, queries, 11, within=np.array(bounds))
    assert [found for found, _ in narrowed] == [found for found, _ in exact_top(conn, DEFAULT_TABLES, queries, 11)]


def test_the_one_scan_exact_search_refuses_queries_of_another_dimension(conn: psycopg.Connection) -> None:
    # The table's COPY rows are parsed by their fixed layout: a width that is not the table's must
    # stop with one clear line, not rank bytes of the wrong rows.
    with pytest.raises(ValueError, match=r"not \(uuid, vector\(16\)\): cannot compute recall"):
        exact_top(conn, DEFAULT_TABLES, np.zeros((3, 16), dtype=np.float32), 10)


def test_a_target_no_setting_reaches_stores_the_best_and_fails_finalize(conn: psycopg.Connection) -> None:
    # 100 lists of 60 rows: one or two probed lists hold only part of any top-10.
    conn.execute("DROP INDEX recruit_embedding_ivfflat")
    conn.execute(
        "CREATE INDEX recruit_embedding_ivfflat ON recruit_embedding USING ivfflat (vector vector_l2_ops) WITH (lists = 100)"
    )
    report = tune_search(conn, min_recall=1.0, queries=40, values=[1, 2])
    assert report is not None and not report.reached and report.value == max(report.tried, key=report.tried.get)  # type: ignore[arg-type]
    assert read_search_setting(conn).value == report.value  # type: ignore[union-attr]
    message = recall_failure(report.as_dict())
    assert message and "below min_recall 1.000" in message and "searches now use the best one" in message
    with pytest.raises(ValueError, match="min_recall"):
        tune_search(conn, min_recall=1.5)


@pytest.mark.parametrize("iterative", [True, False], ids=["pgvector-0.8-iterative", "pre-0.8-path"])
def test_a_filtered_search_returns_k_matching_rows_whenever_k_match(
    conn: psycopg.Connection, frame: pd.DataFrame, iterative: bool
) -> None:
    tune_search(conn, queries=30)
    # exact_filter_rows=0: every filter through the index unless the grown setting reaches every list.
    searcher = Searcher(conn, exact_filter_rows=0)
    assert searcher.version >= (0, 8, 0)
    searcher.iterative = iterative  # False: the path for a user's pgvector 0.5-0.7, on this 0.8 server
    queries = np.stack(list(frame["job_post_vectors"][:20])).astype(np.float32)
    broad = ["english_level>=intermediate", "exp_years<=10"]
    broad_mask = (
        frame["English Level"].isin(["intermediate", "upper", "fluent"]) & (frame["Exp Years"] <= 10)
    ).to_numpy()
    selective = ["primary_keyword=Python", "english_level>=upper", "exp_years<=7"]
    selective_mask = (
        (frame["Primary Keyword"] == "Python")
        & frame["English Level"].isin(["upper", "fluent"])
        & (frame["Exp Years"] <= 7)
    ).to_numpy()
    assert 10 < selective_mask.sum() < 0.02 * ROWS < 0.2 * ROWS < broad_mask.sum()
    setting = read_search_setting(conn)
    assert setting is not None
    where = lambda filters: sql.SQL(" AND ").join([SearchFilter.parse(f).condition() for f in filters])  # noqa: E731
    # The broad filter grows the tuned probes by 1/keep and stays on the index; the selective one
    # would need every list, so it is searched exactly.
    grown = int(np.ceil(setting.value * ROWS / broad_mask.sum()))
    assert searcher._filtered_plan(where(broad), setting, 10) == (grown if grown < ivfflat_lists(conn) else None)
    assert searcher._filtered_plan(where(selective), setting, 10) is None
    for filters, mask in ((broad, broad_mask), (selective, selective_mask)):
        hits = searcher.search(queries, 10, filters)
        recalls = []
        for query, found in zip(queries, hits, strict=True):
            assert len(found) == 10
            assert all(h.exp_years is not None and h.exp_years <= 10 for h in found)
            assert [h.distance for h in found] == sorted(h.distance for h in found)
            recalls.append(len({h.id for h in found} & set(_exact(frame, mask, query, 10))) / 10)
        assert np.mean(recalls) >= 0.95, (filters, np.mean(recalls))
    # Fewer rows match than asked for: all of them come back.
    rare = ["primary_keyword=Rust", "english_level>=fluent", "exp_years<=0"]
    matches = int(
        ((frame["Primary Keyword"] == "Rust") & (frame["English Level"] == "fluent") & (frame["Exp Years"] == 0)).sum()
    )
    assert 0 < matches < 10
    assert [len(found) for found in searcher.search(queries[:3], 10, rare)] == [matches] * 3


def test_the_hook_searches_through_an_airflow_connection(
    conn: psycopg.Connection, pg_dsn: str, frame: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_EMBEDDINGS_DB", pg_dsn)
    query = np.asarray(frame["job_post_vectors"][0], dtype=np.float32)
    results = PgvectorSearchHook(postgres_conn_id="embeddings_db").search(query, 5, ["exp_years<=3"])
    assert len(results) == 1 and len(results[0]) == 5
    assert all(r["exp_years"] <= 3 for r in results[0])
    assert set(results[0][0]) == {"id", "distance", "company_name", "exp_years", "english_level", "primary_keyword"}
    with pytest.raises(SearchError, match="query dimension 3 does not match the table's vector\\(32\\)"):
        PgvectorSearchHook(postgres_conn_id="embeddings_db").search([0.1, 0.2, 0.3])
