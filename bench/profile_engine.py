"""Where the engine's time goes, read-only: ``python -m bench.profile_engine [--rows N] [--cprofile]``.

``stages`` times each step of the hot path on pre-serialized chunks, without gRPC or a database
(microseconds a row, single thread), then the same writes against PostgreSQL split into their
statements. ``--cprofile`` additionally runs one whole engine measurement under cProfile on every
thread and prints the top functions. Nothing here changes engine code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from airflow_embedding_provider.ai_server.dataset import load_dataset
from airflow_embedding_provider.pipeline import DEFAULT_SUB_BATCH_SIZE, default_chunk_size
from airflow_embedding_provider.rows import DEFAULT_DIMENSION, RowBatch
from airflow_embedding_provider.storage.copy_binary import embedding_copy_buffer, metadata_copy_buffer
from airflow_embedding_provider.storage.schema import apply_schema
from airflow_embedding_provider.storage.writer import ChunkWriter, keep_last_occurrence
from airflow_embedding_provider.validation import validate_chunk
from airflow_embedding_provider.wire.codec import WireChunk, parse_chunk
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes
from dev.embedded_postgres import EmbeddedPostgres
from dev.sample import write_sample
from dev.stack import REPO_ROOT, ServerProcess

CHUNK = default_chunk_size(DEFAULT_DIMENSION)
SUB_BATCH = DEFAULT_SUB_BATCH_SIZE


def _time(label: str, rows: int, fn: Callable[[], Any], table: list[tuple[str, float]]) -> Any:
    began = time.perf_counter()
    out = fn()
    table.append((label, (time.perf_counter() - began) / rows * 1e6))
    return out


def stages(pkl: Path, dsn: str) -> list[tuple[str, float]]:
    """Microseconds a row for each step, on the whole sample."""
    data = load_dataset(pkl)
    n = len(data)
    table: list[tuple[str, float]] = []
    ranges = [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]
    messages: list[RowChunkBytes] = _time(
        "server: dataset.chunk (encode_rows)", n, lambda: [data.chunk(a, b) for a, b in ranges], table
    )
    wire: list[bytes] = _time("server: SerializeToString", n, lambda: [m.SerializeToString() for m in messages], table)
    chunks: list[WireChunk] = _time(
        "client: parse_chunk (FromString + decode)", n, lambda: [parse_chunk(w) for w in wire], table
    )
    subs = [c.slice(s, s + SUB_BATCH) for c in chunks for s in range(0, len(c), SUB_BATCH)]
    validated = _time("client: validate_chunk", n, lambda: [validate_chunk(s, DEFAULT_DIMENSION) for s in subs], table)
    batches: list[RowBatch] = [b for b, _ in validated]
    _time("client: keep_last_occurrence", n, lambda: [keep_last_occurrence(b) for b in batches], table)
    _time("client: embedding_copy_buffer", n, lambda: [embedding_copy_buffer(b.ids, b.vectors) for b in batches], table)
    _time("client: metadata_copy_buffer", n, lambda: [metadata_copy_buffer(b) for b in batches], table)

    # The writer's statements, one sub-batch a transaction, on one connection (no threads).
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_schema(conn, DEFAULT_DIMENSION)
        writer = ChunkWriter(conn, dimension=DEFAULT_DIMENSION)
        _time("db: ChunkWriter.write (whole, 1 conn)", n, lambda: [writer.write(b) for b in batches], table)
        conn.execute("TRUNCATE recruit_metadata CASCADE")
        _split(conn, batches, UPSERT_STEPS, "db split", table)
        conn.execute("TRUNCATE recruit_metadata CASCADE")
        _split(conn, batches, DIRECT_STEPS, "db direct", table)
    return table


#: A step of one sub-batch's transaction, timed on its own: ``(name, fn(writer, cursor, batch))``.
Step = tuple[str, Callable[[ChunkWriter, psycopg.Cursor, RowBatch], object]]


def _restage_metadata(writer: ChunkWriter, cur: psycopg.Cursor, batch: RowBatch) -> None:
    writer.clear_stage(cur)
    writer.stage_metadata(cur, batch)


def _probe_expecting_none(writer: ChunkWriter, cur: psycopg.Cursor, batch: RowBatch) -> None:
    if writer.has_stored_ids(cur, batch):
        raise RuntimeError("the direct path's figures need an empty table")


# The steps of ChunkWriter._upsert (rows that may be stored), the writer's own methods in order.
UPSERT_STEPS: list[Step] = [
    ("copy metadata", _restage_metadata),
    ("copy embedding", lambda w, cur, b: w.stage_vectors(cur, b)),
    ("upsert metadata", lambda w, cur, b: w.merge_metadata(cur)),
    ("upsert embedding", lambda w, cur, b: w.merge_vectors(cur)),
]
# The steps for rows not stored yet (COPY straight into the tables).
DIRECT_STEPS: list[Step] = [
    ("probe for stored ids", _probe_expecting_none),
    ("insert_new (COPY both tables)", lambda w, cur, b: w.insert_new(cur, b)),
]


def _split(
    conn: psycopg.Connection, batches: list[RowBatch], steps: list[Step], label: str, table: list[tuple[str, float]]
) -> None:
    """Each step's microseconds a row, one sub-batch a transaction, then the commit's."""
    writer = ChunkWriter(conn, dimension=DEFAULT_DIMENSION)
    writer.ensure_stage()
    parts = dict.fromkeys([name for name, _ in steps] + ["commit"], 0.0)
    for batch in batches:
        with conn.transaction(), conn.cursor() as cur:
            for name, step in steps:
                began = time.perf_counter()
                step(writer, cur, batch)
                parts[name] += time.perf_counter() - began
            tx_began = time.perf_counter()
        parts["commit"] += time.perf_counter() - tx_began
    n = sum(len(b) for b in batches)
    for name, seconds in parts.items():
        table.append((f"{label}: {name}", seconds / n * 1e6))


def cprofile(pkl: Path, dsn: str, rows: int, out: Path) -> None:
    """One engine measurement (default setting) under cProfile; prints the top functions."""
    with ServerProcess(["ai-server", "--pkl", str(pkl)]) as ai:
        spec = {
            "target": ai.target,
            "dimension": DEFAULT_DIMENSION,
            "rows": rows,
            "dsn": dsn,
            "chunk_size": CHUNK,
            "sub_batch_size": SUB_BATCH,
            "connections": 2,
            "profile": True,
        }
        result = out.with_suffix(".json")
        subprocess.run(
            [sys.executable, "-m", "bench.measure", "engine", json.dumps(spec), str(result)],
            cwd=REPO_ROOT,
            env={**os.environ, "BENCH_PROFILE_OUT": str(out)},
            check=True,
        )
    print(f"engine under cProfile: {json.loads(result.read_text())}")
    stats = pstats.Stats(str(out))
    stats.sort_stats("tottime").print_stats(25)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".bench")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    pkl = workdir / f"profile-{args.rows}.pkl"
    if not pkl.exists():
        write_sample(pkl, args.rows, layout="seed")
    folder = Path(tempfile.mkdtemp(prefix="bench-profile-pg-", dir=workdir))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        pg = stack.enter_context(EmbeddedPostgres(folder / "data"))
        table = stages(pkl, pg.create_database("profile_stages"))
        print(f"\nper-row cost of each step, {args.rows} rows (microseconds a row, one thread):")
        for label, micros in table:
            print(f"  {label:<46} {micros:8.1f} us/row")
        if args.cprofile:
            cprofile(pkl, pg.create_database("profile_engine"), args.rows, workdir / "engine.prof")
    return 0


if __name__ == "__main__":
    sys.exit(main())
