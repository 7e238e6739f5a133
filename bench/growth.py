"""What grows with the table in the engine's write path: ``python -m bench.growth [--rows N] [--prefill M]``.

The engine writes a first load as many small transactions (one a sub-batch): a stored-id range
probe, COPY BINARY of the metadata rows, COPY BINARY of the embedding rows (whose foreign key
checks each row against the metadata primary key), the checkpoint advance, the commit. This
times each of those statements a row, for ``N`` new rows written into an empty table and into one
that already holds ``M`` rows (filled by one COPY, as the ceiling does), with the foreign-key
trigger on and off, next to one COPY of the same ``N`` rows. Buffer reads and WAL come from
PostgreSQL's own counters (``pg_statio_user_tables``/``_indexes``, ``pg_stat_wal``).

Ids are UUIDv7 in order, as a first load sends them, and the ``N`` new rows come after the ``M``
stored ones. One connection, no gRPC: this isolates the database side. Read-only with respect to
the engine: nothing here changes engine code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from airflow_embedding_provider.pipeline import DEFAULT_SUB_BATCH_SIZE
from airflow_embedding_provider.rows import DEFAULT_DIMENSION, RowBatch
from airflow_embedding_provider.storage.checkpoint import DEFAULT_STREAM, advance_checkpoint
from airflow_embedding_provider.storage.copy_binary import HEADER, TRAILER, embedding_copy_buffer, metadata_copy_buffer
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, apply_schema
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.wire.contract import DEFAULT_CHUNK_SIZE
from dev.embedded_postgres import EmbeddedPostgres
from dev.sample import (
    COMPANIES,
    ENGLISH_LEVELS,
    EPOCH_MS,
    KEYWORDS,
    uuid7_strings,
    write_sample,
)
from dev.stack import REPO_ROOT, ServerProcess

BLOCK = 50_000
EARLIER_MS = 10**10  # about 115 days
ENGINE_ROUNDS = 2
STEPS = ("probe", "copy metadata", "copy embedding", "checkpoint", "commit")
RELATIONS = ("recruit_metadata", "recruit_metadata_pkey", "recruit_embedding", "recruit_embedding_pkey")


def _batch(ids: list[str], seed: int) -> RowBatch:
    rng = np.random.default_rng(seed)
    n = len(ids)
    vectors = rng.standard_normal((n, DEFAULT_DIMENSION), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return RowBatch(
        ids=ids,
        company_name=list(rng.choice(np.array(COMPANIES, dtype=object), size=n)),
        exp_years=[int(x) for x in rng.integers(0, 16, size=n)],
        english_level=list(rng.choice(np.array(ENGLISH_LEVELS, dtype=object), size=n)),
        primary_keyword=list(rng.choice(np.array(KEYWORDS, dtype=object), size=n)),
        vectors=vectors,
    )


def _blocks(ids: list[str], size: int, seed: int) -> Iterator[RowBatch]:
    for a in range(0, len(ids), size):
        yield _batch(ids[a : a + size], seed + a)


def _copy_all(conn: psycopg.Connection, ids: list[str], seed: int) -> float:
    """One transaction, one COPY a table: the ceiling's way. Seconds taken by the COPYs alone
    (the rows are made and encoded first, a block at a time)."""
    meta, emb = [], []
    for block in _blocks(ids, BLOCK, seed):
        meta.append(metadata_copy_buffer(block)[len(HEADER) : -len(TRAILER)])
        emb.append(embedding_copy_buffer(block.ids, block.vectors)[len(HEADER) : -len(TRAILER)])
    began = time.perf_counter()
    with conn.transaction(), conn.cursor() as cur:
        for statement, buffers in (
            (
                "COPY recruit_metadata (id, company_name, exp_years, english_level, primary_keyword) "
                "FROM STDIN (FORMAT BINARY)",
                meta,
            ),
            ("COPY recruit_embedding (id, vector) FROM STDIN (FORMAT BINARY)", emb),
        ):
            with cur.copy(statement) as copy:
                copy.write(HEADER)
                for buf in buffers:
                    copy.write(buf)
                copy.write(TRAILER)
    return time.perf_counter() - began


def _counters(conn: psycopg.Connection) -> dict[str, int]:
    out: dict[str, int] = {}
    for query in (
        "SELECT relname, heap_blks_read, heap_blks_hit FROM pg_statio_user_tables WHERE relname = ANY(%s)",
        "SELECT indexrelname, idx_blks_read, idx_blks_hit FROM pg_statio_user_indexes WHERE indexrelname = ANY(%s)",
    ):
        for rel, read, hit in conn.execute(query, (list(RELATIONS),)).fetchall():
            out[f"{rel} read"] = int(read or 0)
            out[f"{rel} hit"] = int(hit or 0)
    wal = conn.execute("SELECT wal_bytes FROM pg_stat_wal").fetchone()
    out["wal bytes"] = int(wal[0]) if wal else 0
    return out


def _engine_like(conn: psycopg.Connection, ids: list[str], seed: int, sub_batch: int) -> dict[str, Any]:
    """The engine's direct path (``ChunkWriter._store(direct=True)``), a statement at a time."""
    writer = ChunkWriter(conn, dimension=DEFAULT_DIMENSION)
    times = dict.fromkeys(STEPS, 0.0)
    # A backend publishes its statistics at most once a second: make the writer's flush now, then
    # read them through a second connection.
    with psycopg.connect(conn.info.dsn, autocommit=True) as stats:
        conn.execute("SELECT pg_stat_force_next_flush()")
        stats.execute("SELECT pg_stat_clear_snapshot()")
        before = _counters(stats)
        # Encoded before timing: only the database's side is timed.
        batches = [
            (b, metadata_copy_buffer(b), embedding_copy_buffer(b.ids, b.vectors)) for b in _blocks(ids, sub_batch, seed)
        ]
        began = time.perf_counter()
        for batch, meta_buf, emb_buf in batches:
            conn.execute("BEGIN")
            with conn.cursor() as cur:
                t0 = time.perf_counter()
                if writer.has_stored_ids(cur, batch):
                    raise SystemExit("a new id is already stored")
                t1 = time.perf_counter()
                with cur.copy(
                    "COPY recruit_metadata (id, company_name, exp_years, english_level, primary_keyword) "
                    "FROM STDIN (FORMAT BINARY)"
                ) as copy:
                    copy.write(meta_buf)
                t2 = time.perf_counter()
                with cur.copy("COPY recruit_embedding (id, vector) FROM STDIN (FORMAT BINARY)") as copy:
                    copy.write(emb_buf)
                t3 = time.perf_counter()
                advance_checkpoint(cur, DEFAULT_TABLES, DEFAULT_STREAM, batch.ids[-1])
                t4 = time.perf_counter()
            conn.execute("COMMIT")
            t5 = time.perf_counter()
            for step, (a, b) in zip(STEPS, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)), strict=True):
                times[step] += b - a
        seconds = time.perf_counter() - began
        conn.execute("SELECT pg_stat_force_next_flush()")
        stats.execute("SELECT pg_stat_clear_snapshot()")
        after = _counters(stats)
    n = len(ids)
    return {
        "rows": n,
        "seconds": seconds,
        "us_per_row": {k: round(v / n * 1e6, 2) for k, v in times.items()},
        "total_us_per_row": round(seconds / n * 1e6, 2),
        "counters_per_1000_rows": {k: round((after[k] - before.get(k, 0)) / n * 1000, 1) for k in after},
    }


def _fk(conn: psycopg.Connection, enabled: bool) -> None:
    # Superuser only (the embedded server's): the foreign key is a system trigger.
    conn.execute(f"ALTER TABLE recruit_embedding {'ENABLE' if enabled else 'DISABLE'} TRIGGER ALL")


def run(rows: int, prefill: int, sub_batch: int, workdir: Path) -> dict[str, Any]:
    pgdata = workdir / "growth-pgdata"
    shutil.rmtree(pgdata, ignore_errors=True)
    pg = EmbeddedPostgres(pgdata)
    pg.start()
    try:
        rng = np.random.default_rng(11)
        # Sorted: ids made in the same millisecond are in random order (RFC 9562 random bits).
        # Made before the bench sample's epoch, so the engine's rows (engine_rounds) come after them.
        ids = sorted(uuid7_strings(prefill + 3 * rows, rng, start_ms=EPOCH_MS - EARLIER_MS))
        stored, new_a, new_b, new_c = (
            ids[:prefill],
            ids[prefill : prefill + rows],
            ids[prefill + rows : prefill + 2 * rows],
            ids[prefill + 2 * rows :],
        )
        results: dict[str, Any] = {"rows": rows, "prefill": prefill, "sub_batch": sub_batch}

        def fresh(name: str) -> psycopg.Connection:
            conn = psycopg.connect(pg.create_database(name), autocommit=True)
            apply_schema(conn, DEFAULT_DIMENSION)
            return conn

        print(f"growth: {rows} rows in sub-batches of {sub_batch}, into empty tables and after {prefill}", flush=True)
        with fresh("growth_empty") as conn:
            results["empty, FK on"] = _engine_like(conn, new_a, 1, sub_batch)
        with fresh("growth_empty_nofk") as conn:
            _fk(conn, False)
            results["empty, FK off"] = _engine_like(conn, new_a, 1, sub_batch)
        with fresh("growth_empty_copy") as conn:
            results["empty, one COPY"] = {"rows": rows, "seconds": _copy_all(conn, new_a, 1)}
        with fresh("growth_full") as conn:
            results["prefill_seconds"] = _copy_all(conn, stored, 1000)
            conn.execute("CHECKPOINT")
            results[f"after {prefill}, FK on"] = _engine_like(conn, new_a, 1, sub_batch)
            _fk(conn, False)
            results[f"after {prefill + rows}, FK off"] = _engine_like(conn, new_b, 2, sub_batch)
            _fk(conn, True)
            results[f"after {prefill + 2 * rows}, one COPY"] = {"rows": rows, "seconds": _copy_all(conn, new_c, 3)}
            size = conn.execute(
                "SELECT pg_relation_size('recruit_metadata_pkey'), pg_relation_size('recruit_embedding_pkey'), "
                "pg_total_relation_size('recruit_embedding'), current_setting('shared_buffers')"
            ).fetchone()
            results["engine"] = engine_rounds(pg, conn, rows, workdir)
            results["sizes"] = {
                "metadata_pkey_mib": round(size[0] / 2**20, 1) if size else None,
                "embedding_pkey_mib": round(size[1] / 2**20, 1) if size else None,
                "embedding_total_mib": round(size[2] / 2**20, 1) if size else None,
                "shared_buffers": size[3] if size else None,
            }
    finally:
        pg.stop()
        shutil.rmtree(pgdata, ignore_errors=True)
    return results


def _engine(ai: ServerProcess, dsn: str, rows: int, workdir: Path, *, quiet: bool = False) -> dict[str, Any]:
    """One run of the whole engine (``bench.measure engine``: gRPC, 4 writers, its defaults) from
    ``ai`` into ``dsn``, which holds ``rows`` rows afterwards (checked); its result."""
    spec = {
        "target": ai.target,
        "dimension": DEFAULT_DIMENSION,
        "rows": rows,
        "dsn": dsn,
        "chunk_size": DEFAULT_CHUNK_SIZE,
        "sub_batch_size": DEFAULT_SUB_BATCH_SIZE,
        "connections": 4,
    }
    result_path = workdir / "growth-engine.json"
    subprocess.run(
        [sys.executable, "-m", "bench.measure", "engine", json.dumps(spec), str(result_path)],
        cwd=REPO_ROOT,
        check=True,
        stdout=subprocess.DEVNULL if quiet else None,
    )
    result: dict[str, Any] = json.loads(result_path.read_text())
    return result


def engine_rounds(pg: EmbeddedPostgres, full: psycopg.Connection, rows: int, workdir: Path) -> dict[str, Any]:
    """The whole engine (``bench.measure engine``: gRPC, 4 writers, its defaults) on ``rows`` new rows,
    into an empty database and into ``full``, alternately, ``ENGINE_ROUNDS`` times each; the new
    rows are deleted (and the tables vacuumed) after each run so every run is a first load."""
    pkl = workdir / f"sample-{rows}-seed7.pkl"
    if not pkl.exists():
        write_sample(pkl, rows, seed=7)
    held = full.execute("SELECT count(*) FROM recruit_metadata").fetchone()
    stored = int(held[0]) if held else 0
    empty_dsn = pg.create_database("growth_engine_empty")
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        apply_schema(conn, DEFAULT_DIMENSION)
    out: dict[str, Any] = {"stored_before": stored, "rounds": []}
    with ServerProcess(["ai-server", "--pkl", str(pkl)], log_path=workdir / "growth-ai-server.log") as ai:
        for _ in range(ENGINE_ROUNDS):
            for name, dsn, already in (("empty", empty_dsn, 0), (f"after {stored}", full.info.dsn, stored)):
                r = _engine(ai, dsn, already + rows, workdir)
                out["rounds"].append(
                    {"case": name, "seconds": r["seconds"], "rows_per_second": r["rows"] / r["seconds"]}
                )
                print(f"  engine {name}: {r['rows']} rows in {r['seconds']:.2f} s", flush=True)
                with psycopg.connect(dsn, autocommit=True) as conn:
                    # Back to the state before: the new rows go (the embeddings by cascade).
                    conn.execute("DELETE FROM recruit_metadata WHERE id >= %s::uuid", (_epoch_uuid(),))
                    conn.execute("DELETE FROM embedding_batch_checkpoint")
                    conn.execute("VACUUM recruit_metadata, recruit_embedding")
    return out


def autovacuum_rounds(pkl: Path, rounds: int, workdir: Path) -> dict[str, Any]:
    """The whole engine loading ``pkl`` into empty tables with autovacuum on and off for those
    tables, alternately. Many small commits make the inserts visible to autovacuum during the
    load (PostgreSQL 13+ vacuums after inserts too), one COPY transaction only after it."""
    pgdata = workdir / "growth-av-pgdata"
    shutil.rmtree(pgdata, ignore_errors=True)
    pg = EmbeddedPostgres(pgdata)
    pg.start()
    out: dict[str, Any] = {"pkl": pkl.name, "rounds": []}
    try:
        with ServerProcess(["ai-server", "--pkl", str(pkl)], log_path=workdir / "growth-ai-server.log") as ai:
            ai_rows = None
            for k in range(rounds):
                for enabled in (True, False):
                    dsn = pg.create_database(f"growth_av_{k}_{'on' if enabled else 'off'}")
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        apply_schema(conn, DEFAULT_DIMENSION)
                        for table in ("recruit_metadata", "recruit_embedding"):
                            conn.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = {'on' if enabled else 'off'})")
                    if ai_rows is None:
                        from airflow_embedding_provider.ai_server.dataset import load_dataset

                        ai_rows = len(load_dataset(pkl))
                    r = _engine(ai, dsn, ai_rows, workdir, quiet=True)
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        counts = conn.execute(
                            "SELECT coalesce(sum(autovacuum_count), 0), coalesce(sum(autoanalyze_count), 0) "
                            "FROM pg_stat_user_tables WHERE relname IN ('recruit_metadata', 'recruit_embedding')"
                        ).fetchone()
                    row = {
                        "autovacuum": enabled,
                        "seconds": r["seconds"],
                        "rows_per_second": r["rows"] / r["seconds"],
                        "autovacuums_after": int(counts[0]) if counts else None,
                        "autoanalyzes_after": int(counts[1]) if counts else None,
                    }
                    out["rounds"].append(row)
                    print(
                        f"  autovacuum {'on ' if enabled else 'off'}: {r['rows']} rows in {r['seconds']:.2f} s, {row}",
                        flush=True,
                    )
    finally:
        pg.stop()
        shutil.rmtree(pgdata, ignore_errors=True)
    return out


def _epoch_uuid() -> str:
    """The least UUIDv7 of the bench sample's epoch: the sample's ids are at or above it, the early ones below."""
    h = f"{EPOCH_MS:012x}7000800000000000000000"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def render(results: dict[str, Any]) -> str:
    lines = [
        f"rows {results['rows']:,} in sub-batches of {results['sub_batch']}; prefill {results['prefill']:,} "
        f"rows by one COPY in {results['prefill_seconds']:.1f} s; sizes {results['sizes']}",
        "",
        "| case | seconds | us/row total | "
        + " | ".join(STEPS)
        + " | index blocks read / hit per 1000 rows | WAL KiB per 1000 rows |",
        "|---|---:|---:|" + "---:|" * len(STEPS) + "---|---:|",
    ]
    for case, r in results.items():
        if not isinstance(r, dict) or "seconds" not in r:
            continue
        if "us_per_row" not in r:
            lines.append(
                f"| {case} | {r['seconds']:.2f} | {r['seconds'] / r['rows'] * 1e6:.1f} | "
                + " | ".join("-" for _ in STEPS)
                + " | - | - |"
            )
            continue
        c = r["counters_per_1000_rows"]
        idx = ", ".join(
            f"{rel.split('_')[1]} {c.get(rel + ' read', 0):.0f}/{c.get(rel + ' hit', 0):.0f}"
            for rel in RELATIONS
            if rel.endswith("pkey")
        )
        lines.append(
            f"| {case} | {r['seconds']:.2f} | {r['total_us_per_row']:.1f} | "
            + " | ".join(f"{r['us_per_row'][s]:.1f}" for s in STEPS)
            + f" | {idx} | {c.get('wal bytes', 0) / 1024:.0f} |"
        )
    engine = results.get("engine")
    if engine:
        lines += ["", f"whole engine (4 writers, gRPC), {results['rows']:,} new rows, alternating:", ""]
        lines += [f"- {r['case']}: {r['seconds']:.2f} s, {r['rows_per_second']:,.0f} rows/s" for r in engine["rounds"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--prefill", type=int, default=900_000)
    parser.add_argument("--sub-batch", type=int, default=DEFAULT_SUB_BATCH_SIZE)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".bench")
    parser.add_argument(
        "--autovacuum-pkl", type=Path, help="instead: the engine loading this sample with autovacuum on and off"
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.autovacuum_pkl is not None:
        av = autovacuum_rounds(args.autovacuum_pkl.resolve(), ENGINE_ROUNDS, args.workdir.resolve())
        (args.workdir / f"growth-autovacuum-{args.autovacuum_pkl.stem}.json").write_text(json.dumps(av, indent=2))
        return 0
    results = run(args.rows, args.prefill, args.sub_batch, args.workdir.resolve())
    out = args.workdir / f"growth-{args.rows}-{args.prefill}.json"
    out.write_text(json.dumps(results, indent=2))
    print(render(results))
    print(f"result: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
