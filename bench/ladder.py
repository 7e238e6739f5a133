"""The engine built up from its floor, CPU a row at each step: ``python -m bench.ladder [--rows N] [--rounds K]``.

Each step adds one part of the ingest path to the one before, on the same stream from one AI
server, each on a fresh embedded PostgreSQL (but the first, which writes nothing), with the DAG's
chunk and sub-batch (``bench.run.DEFAULT_SETTING``):

1. ``receive``: the hook's stream, decoded (``GrpcEmbeddingHook.stream_chunks`` behind ``prefetch``);
2. ``+ validate, encode``: ``validate_chunk`` and both COPY streams built, written nowhere;
3. ``+ COPY, one thread``: those streams COPYed into both tables, one transaction a chunk;
4. ``+ writer, one thread``: ``ChunkWriter.write`` instead (stored-id probe, outbox, progress);
5. ``engine, K writers``: ``ingest_chunks`` with the DAG's connections, as ``bench.measure engine``.

It prints rows/s and the CPU a row of the worker (this process, user + system) and of
PostgreSQL (all its processes) over each step's timed part: what each part of the path costs,
measured, against the COPY ceiling's (``bench.cpu_split --ceiling``). Nothing here changes engine
code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

from airflow_embedding_provider.rows import DEFAULT_DIMENSION
from bench.cpu_split import engine_sample, fresh_server
from bench.procmem import own_cpu_seconds, tree_cpu_seconds
from bench.run import DEFAULT_ROWS, DEFAULT_SETTING
from dev.stack import REPO_ROOT, ServerProcess

STEPS = ("receive", "+ validate, encode", "+ COPY, one thread", "+ writer, one thread", "engine")
_META = (
    "COPY recruit_metadata (id, company_name, exp_years, english_level, primary_keyword, row_hash) "
    "FROM STDIN (FORMAT BINARY)"
)
_EMBEDDING = "COPY recruit_embedding (id, vector) FROM STDIN (FORMAT BINARY)"


def _run(step: str, chunks: Callable[[], Iterator], dsn: str | None) -> int:
    """Rows the step handled; writes into ``dsn``'s tables for the steps that write."""
    from airflow_embedding_provider.partitions import Partition
    from airflow_embedding_provider.pipeline import ingest_chunks
    from airflow_embedding_provider.storage.checkpoint import PartitionKey, save_plan
    from airflow_embedding_provider.storage.copy_binary import embedding_copy_view, metadata_copy_buffer
    from airflow_embedding_provider.storage.outbox import CacheRequest
    from airflow_embedding_provider.storage.schema import DEFAULT_TABLES
    from airflow_embedding_provider.storage.writer import ChunkWriter
    from airflow_embedding_provider.validation import validate_chunk

    dimension = DEFAULT_DIMENSION
    if step == "receive":
        return sum(len(chunk) for chunk in chunks())
    if step == "+ validate, encode":
        rows = 0
        for chunk in chunks():
            batch, _ = validate_chunk(chunk, dimension)
            metadata_copy_buffer(batch, batch.hashes)
            embedding_copy_view(batch.ids, batch.vectors)
            rows += len(batch)
        return rows
    assert dsn is not None
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(DEFAULT_SETTING.connections)]
    try:
        if step == "+ COPY, one thread":
            rows = 0
            with conns[0].cursor() as cur:
                for chunk in chunks():
                    batch, _ = validate_chunk(chunk, dimension)
                    with conns[0].transaction():
                        with cur.copy(_META) as copy:
                            copy.write(metadata_copy_buffer(batch, batch.hashes))
                        with cur.copy(_EMBEDDING) as copy:
                            copy.write(embedding_copy_view(batch.ids, batch.vectors))
                    rows += len(batch)
            return rows
        save_plan(conns[0], DEFAULT_TABLES, "recruit", "ladder", [Partition(0, None, None, 0)])
        key = PartitionKey("recruit", "ladder", 0)
        writers = [
            ChunkWriter(c, dimension=dimension, cache_request=CacheRequest("recruit", f"ladder/{i}"))
            for i, c in enumerate(conns)
        ]
        for writer in writers:
            writer.ensure_stage()
        if step == "+ writer, one thread":
            rows = 0
            for chunk in chunks():
                batch, rejected = validate_chunk(chunk, dimension)
                writers[0].write(batch, rejected, checkpoint=batch.last_id, partition=key)
                rows += len(batch)
            return rows
        stats = ingest_chunks(
            chunks(), writers, dimension=dimension, sub_batch_size=DEFAULT_SETTING.sub_batch_size, partition=key
        )
        return stats.rows_received
    finally:
        for conn in conns:
            conn.close()


def _stored(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM recruit_metadata) + (SELECT count(*) FROM recruit_embedding)")
        return int(row.fetchone()[0])  # type: ignore[index]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".bench")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pkl = engine_sample(workdir, args.rows)
    ai = ServerProcess(["ai-server", "--pkl", str(pkl)], log_path=workdir / "ai-server.log")
    ai.start(timeout=600)
    host, port = ai.target.rsplit(":", 1)
    os.environ["AIRFLOW_CONN_EMBEDDING_GRPC_DEFAULT"] = json.dumps(
        {"conn_type": "embedding_grpc", "host": host, "port": int(port), "extra": {"timeout": 30}}
    )
    from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
    from airflow_embedding_provider.pipeline import prefetch
    from airflow_embedding_provider.storage.schema import apply_schema

    hook = GrpcEmbeddingHook()
    hook.wait_until_ready()

    def chunks() -> Iterator:
        return prefetch(hook.stream_chunks(after=None, chunk_size=DEFAULT_SETTING.chunk_size))

    print(
        f"{args.rows:,} rows, chunk {DEFAULT_SETTING.chunk_size}, sub-batch {DEFAULT_SETTING.sub_batch_size}, "
        f"{DEFAULT_SETTING.connections} writers; CPU us a row (user + system) over each step's timed part:"
    )
    try:
        for k in range(args.rounds):
            for step in STEPS:
                with fresh_server(workdir) as (pg, _):
                    pg_pid = pg.pid
                    dsn = pg.create_database("ladder")
                    with psycopg.connect(dsn, autocommit=True) as conn:
                        apply_schema(conn, DEFAULT_DIMENSION)
                    pg_cpu, cpu, began = tree_cpu_seconds(pg_pid), own_cpu_seconds(), time.perf_counter()
                    rows = _run(step, chunks, dsn)
                    seconds, cpu = time.perf_counter() - began, own_cpu_seconds() - cpu
                    pg_after = tree_cpu_seconds(pg_pid)
                    writes = step not in STEPS[:2]
                    if writes and _stored(dsn) != 2 * args.rows:
                        raise SystemExit(f"{step}: stored {_stored(dsn)} rows in both tables, not {2 * args.rows}")
                if rows != args.rows:
                    raise SystemExit(f"{step}: handled {rows} rows, not {args.rows}")
                assert pg_cpu is not None and pg_after is not None
                database = f"PostgreSQL {(pg_after - pg_cpu) / rows * 1e6:5.1f}" if writes else " " * 16
                print(
                    f"  round {k + 1}  {step:22s} {rows / seconds:>9,.0f} rows/s  worker {cpu / rows * 1e6:5.1f}  "
                    f"{database}  (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
    finally:
        hook.close()
        ai.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
