"""Search bench: recall@10 and queries/s of ivfflat and HNSW against exact search, in one run.

``python -m bench.search [--rows 141897]`` starts the embedded PostgreSQL, loads clustered rows
(neighbourhoods like text embeddings, dev/sample.py) with COPY BINARY, then for each index
method: builds it as finalize does (timed), runs the recall gate (storage/recall.py), and answers
held-out queries through the provider's search (storage/search.py) unfiltered and with a
``primary_keyword`` filter, against exact search in SQL over the same rows. Recall is measured
against numpy's exact top-10. The filtered search runs both the pgvector 0.8 path (iterative index
scans) and the path a pgvector 0.5-0.7 server gets (over-fetch, then exact search for what comes
back short). Prints a Markdown report.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from airflow_embedding_provider.rows import DEFAULT_DIMENSION, RowBatch
from airflow_embedding_provider.storage.copy_binary import embedding_copy_buffer, metadata_copy_buffer
from airflow_embedding_provider.storage.recall import tune_search
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, apply_schema, ensure_ann_index
from airflow_embedding_provider.storage.search import (
    Searcher,
    SearchFilter,
    SearchHit,
    pgvector_version,
    read_search_setting,
)
from dev.embedded_postgres import EmbeddedPostgres
from dev.sample import make_sample

SEED_ROWS = 141_897
K = 10
KEYWORD = "Python"


def _load(conn: psycopg.Connection, ids: Sequence[str], frame: Any, vectors: np.ndarray) -> float:
    batch = RowBatch(
        ids=list(ids),
        company_name=list(frame["Company Name"]),
        exp_years=[int(v) for v in frame["Exp Years"]],
        english_level=list(frame["English Level"]),
        primary_keyword=list(frame["Primary Keyword"]),
        vectors=vectors,
    )
    began = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy(
            "COPY recruit_metadata (id, company_name, exp_years, english_level, primary_keyword) FROM STDIN "
            "WITH (FORMAT BINARY)"
        ) as copy:
            copy.write(metadata_copy_buffer(batch))
        with cur.copy("COPY recruit_embedding (id, vector) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.write(embedding_copy_buffer(batch.ids, vectors))
    return time.perf_counter() - began


def _truth(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> list[set[str]]:
    out = []
    for query in queries:
        distances = ((vectors - query) ** 2).sum(axis=1)
        out.append(set(ids[np.argpartition(distances, K)[:K]]))
    return out


def _timed(run: Callable[[np.ndarray], list[SearchHit]], queries: np.ndarray) -> tuple[list[list[SearchHit]], float]:
    began = time.perf_counter()
    hits = [run(q) for q in queries]
    return hits, len(queries) / (time.perf_counter() - began)


def _recall(hits: list[list[SearchHit]], truth: list[set[str]]) -> float:
    return float(np.mean([len({h.id for h in found} & t) / K for found, t in zip(hits, truth, strict=True)]))


def run(rows: int, queries: int, exact_queries: int, workdir: Path) -> list[str]:
    frame = make_sample(rows + queries, seed=41, clusters=max(10, rows // 10))
    loaded, held = frame.iloc[:rows].reset_index(drop=True), frame.iloc[rows:].reset_index(drop=True)
    vectors = np.stack(list(loaded["job_post_vectors"])).astype(np.float32)
    ids = loaded["id"].to_numpy()
    qs = np.stack(list(held["job_post_vectors"])).astype(np.float32)
    masks = {
        f"primary_keyword={KEYWORD}": (loaded["Primary Keyword"] == KEYWORD).to_numpy(),
        "english_level>=intermediate": loaded["English Level"].isin(["intermediate", "upper", "fluent"]).to_numpy(),
    }
    truth = _truth(vectors, ids, qs)
    truths = {name: _truth(vectors[m], ids[m], qs) for name, m in masks.items()}
    out: list[str] = []
    pg = EmbeddedPostgres(workdir / "pgdata").start()
    try:
        dsn = pg.create_database("search_bench")
        with psycopg.connect(dsn, autocommit=True) as conn:
            version = conn.execute("SHOW server_version").fetchone()
            apply_schema(conn, DEFAULT_DIMENSION)
            copy_seconds = _load(conn, list(ids), loaded, vectors)
            pgv = ".".join(map(str, pgvector_version(conn)))
            out += [
                f"rows: {rows:,} clustered ({rows // 10} neighbourhoods), dimension {DEFAULT_DIMENSION}; "
                f"{len(qs)} held-out queries; filters keep "
                + ", ".join(f"{name} {m.mean():.1%}" for name, m in masks.items()),
                f"PostgreSQL {version[0] if version else '?'}, pgvector {pgv} (embedded); "
                f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), load at start {os.getloadavg()}",
                f"COPY BINARY of both tables: {copy_seconds:.2f} s ({rows / copy_seconds:,.0f} rows/s)",
                "",
                "| index | build s | search setting (recall gate, min 0.95) | filter | path | recall@10 vs numpy | queries/s | exact queries/s (SQL, same rows) | x exact |",
                "|---|---:|---|---|---|---:|---:|---:|---:|",
            ]
            searcher = Searcher(conn)
            exact_plain = _timed(lambda q: searcher.search(q, K, exact=True)[0], qs[:exact_queries])
            exact_filtered = {
                name: _timed(lambda q, f=name: searcher.search(q, K, [f], exact=True)[0], qs[:exact_queries])[1]  # type: ignore[misc]
                for name in masks
            }
            sql_exact_recall = _recall(exact_plain[0], truth[:exact_queries])
            for method in ("ivfflat", "hnsw"):
                began = time.perf_counter()
                assert ensure_ann_index(conn, DEFAULT_TABLES, method)
                build = time.perf_counter() - began
                report = tune_search(conn, DEFAULT_TABLES, min_recall=0.95, queries=50)
                assert report is not None
                setting = f"{report.setting} = {report.value} (gate recall {report.recall_at_10:.3f}, p50 {report.latency_ms_p50:.1f} ms, p95 {report.latency_ms_p95:.1f} ms)"
                plain = _timed(lambda q: searcher.search(q, K)[0], qs)
                out.append(
                    f"| {method} | {build:.1f} | {setting} | none | index | {_recall(plain[0], truth):.3f} | "
                    f"{plain[1]:.0f} | {exact_plain[1]:.1f} | {plain[1] / exact_plain[1]:.1f}x |"
                )
                for name in masks:
                    for iterative, path in ((True, "0.8: iterative scan"), (False, "pre-0.8 path")):
                        searcher.iterative = iterative
                        setting_now = read_search_setting(conn)
                        assert setting_now is not None
                        where = SearchFilter.parse(name).condition()
                        plan = searcher._filtered_plan(where, setting_now, K)
                        how = (
                            "exact (few matches, or every list)"
                            if plan is None
                            else f"index, {setting_now.name} = {plan}"
                        )
                        filtered = _timed(lambda q, f=name: searcher.search(q, K, [f])[0], qs)  # type: ignore[misc]
                        short = sum(len(f) < K for f in filtered[0])
                        out.append(
                            f"| {method} | | | {name} | {path}: {how} | {_recall(filtered[0], truths[name]):.3f} | "
                            f"{filtered[1]:.0f} | {exact_filtered[name]:.1f} | {filtered[1] / exact_filtered[name]:.1f}x |"
                            + (f" {short} short" if short else "")
                        )
                searcher.iterative = searcher.version >= (0, 8, 0)
            out += [
                "",
                f"Exact search in SQL (enable_indexscan off) against numpy's top-10: {sql_exact_recall:.3f} "
                f"(sanity), over {exact_queries} queries. Load at end {os.getloadavg()}.",
            ]
    finally:
        pg.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=SEED_ROWS)
    parser.add_argument("--queries", type=int, default=200, help="held-out queries a measurement")
    parser.add_argument("--exact-queries", type=int, default=40, help="queries for the (slow) exact baseline")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-search-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
    try:
        lines = run(args.rows, args.queries, args.exact_queries, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"python -m bench.search --rows {args.rows}; commit {commit.stdout.strip() or '?'}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
