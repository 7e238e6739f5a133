"""One measurement in its own process: ``python -m bench.measure MODE SPEC_JSON OUT_JSON``.

A fresh interpreter per measurement keeps peak RSS per measurement (``VmHWM``) and keeps one
run's garbage out of the next. Every mode checks what it stored before it reports a figure:
a fast run that lost rows would be no result at all.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import psycopg

from bench.procmem import children_peak_rss_mib, own_cpu_seconds, peak_rss_mib, rss_mib

COPY_READ_BYTES = 4 * 1024 * 1024
ENCODE_BLOCK_ROWS = 50_000
#: Rows of the sample whose AI server gives the process's fixed RSS (interpreter, gRPC, pandas).
TINY_ROWS = 1000

Spec = dict[str, Any]
_T = TypeVar("_T")


def lower_median(items: Sequence[_T], key: Callable[[_T], float]) -> _T:
    """The item whose ``key`` is the median (the lower middle one of an even count): a round that
    was measured, not an average of two. ``items`` must not be empty."""
    ranked = sorted(items, key=key)
    return ranked[(len(ranked) - 1) // 2]


def _count(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn) as conn:
        meta = conn.execute("SELECT count(*) FROM recruit_metadata").fetchone()
        emb = conn.execute("SELECT count(*) FROM recruit_embedding").fetchone()
    assert meta is not None and emb is not None
    return int(meta[0]), int(emb[0])


def _check_stored(dsn: str, expected: int) -> None:
    meta, emb = _count(dsn)
    if (meta, emb) != (expected, expected):
        raise SystemExit(f"stored {meta} metadata / {emb} embedding rows, expected {expected} each")


def sample(spec: Spec) -> dict[str, Any]:
    """The sample pkl (``write_sample``) and a copy with ``changed_fraction`` of its rows changed."""
    import pandas as pd

    from dev.sample import write_sample

    rows, base, changed = int(spec["rows"]), Path(spec["pkl"]), Path(spec["changed_pkl"])
    if not base.exists():
        # Clustered as text embeddings are (dev/sample.py): on uniform noise no ANN index beats
        # exact search, and the recall gate then measures nearly every setting.
        write_sample(base, rows, seed=int(spec["seed"]), layout="seed", clusters=max(10, rows // 10))
    tiny = Path(spec["tiny_pkl"])
    if not tiny.exists():
        write_sample(tiny, TINY_ROWS, seed=int(spec["seed"]), layout="seed")
    count = 0
    if not changed.exists():
        frame = pd.read_pickle(base)
        rng = np.random.default_rng(int(spec["seed"]) + 1000)
        count = max(1, round(rows * float(spec["changed_fraction"])))
        picked = rng.choice(rows, size=count, replace=False)
        fresh = rng.standard_normal((count, frame["job_post_vectors"].iloc[0].size), dtype=np.float32)
        fresh /= np.linalg.norm(fresh, axis=1, keepdims=True)
        vectors = frame["job_post_vectors"].to_numpy(copy=True)
        for k, i in enumerate(picked):
            vectors[i] = fresh[k]
        frame["job_post_vectors"] = vectors
        years = frame["Exp Years"].to_numpy(copy=True)
        years[picked] = (years[picked] + 1) % 16  # metadata changes too, in the same rows
        frame["Exp Years"] = years
        tmp = changed.with_suffix(".tmp")
        frame.to_pickle(tmp)
        tmp.rename(changed)
    return {"rows": rows, "changed_rows": count}


def _copy_file(cur: psycopg.Cursor, statement: str, path: Path) -> None:
    with cur.copy(statement) as copy, open(path, "rb") as f:
        while block := f.read(COPY_READ_BYTES):
            copy.write(block)


def ceiling(spec: Spec) -> dict[str, Any]:
    """(a) COPY BINARY of the rows into the empty tables, from streams encoded before timing."""
    from airflow_embedding_provider.ai_server.dataset import load_dataset
    from airflow_embedding_provider.rows import RowBatch
    from airflow_embedding_provider.storage.copy_binary import (
        HEADER,
        TRAILER,
        embedding_copy_buffer,
        metadata_copy_buffer,
    )
    from airflow_embedding_provider.storage.schema import apply_schema

    meta_path, emb_path = Path(spec["workdir"]) / "ceiling-meta.copy", Path(spec["workdir"]) / "ceiling-emb.copy"
    data = load_dataset(spec["pkl"])  # id order, as the server streams them
    rows, dimension = len(data), data.dimension
    # Encoded to files block by block: the streams are as large as the data, and holding them in
    # memory next to the dataset would double the bench's own footprint at 1M rows.
    everything = RowBatch(
        ids=data.ids,
        company_name=data.company_name,
        exp_years=data.exp_years,
        english_level=data.english_level,
        primary_keyword=data.primary_keyword,
        vectors=data.vectors,
    )
    with open(meta_path, "wb") as meta, open(emb_path, "wb") as emb:
        meta.write(HEADER)
        emb.write(HEADER)
        for a in range(0, rows, ENCODE_BLOCK_ROWS):
            block = everything.slice(a, min(a + ENCODE_BLOCK_ROWS, rows))
            # The engine's own encoders; each block's header and trailer cut so blocks join.
            meta.write(metadata_copy_buffer(block)[len(HEADER) : -len(TRAILER)])
            emb.write(embedding_copy_buffer(block.ids, block.vectors)[len(HEADER) : -len(TRAILER)])
        meta.write(TRAILER)
        emb.write(TRAILER)
    del data
    gc.collect()
    try:
        with psycopg.connect(spec["dsn"], autocommit=True) as conn:
            apply_schema(conn, dimension)
            cpu, began = own_cpu_seconds(), time.perf_counter()
            with conn.transaction(), conn.cursor() as cur:
                _copy_file(
                    cur,
                    "COPY recruit_metadata (id, company_name, exp_years, english_level, primary_keyword) "
                    "FROM STDIN (FORMAT BINARY)",
                    meta_path,
                )
                _copy_file(cur, "COPY recruit_embedding (id, vector) FROM STDIN (FORMAT BINARY)", emb_path)
            seconds, cpu = time.perf_counter() - began, own_cpu_seconds() - cpu
    finally:
        meta_path.unlink(missing_ok=True)
        emb_path.unlink(missing_ok=True)
    _check_stored(spec["dsn"], rows)
    return {"rows": rows, "seconds": seconds, "worker_cpu_seconds": cpu, "peak_rss_mib": None}


def naive(spec: Spec) -> dict[str, Any]:
    """(b) The seed's design done plainly: public ``RowChunk``, ``list(row.vector)``, ``executemany``
    upserts of each 300-row chunk, metadata then embedding then the checkpoint, one commit a chunk."""
    import grpc
    from pgvector.psycopg import register_vector

    from airflow_embedding_provider.storage.schema import apply_schema
    from airflow_embedding_provider.wire import embedding_pb2, embedding_pb2_grpc

    dimension, chunk_size = int(spec["dimension"]), int(spec["chunk_size"])
    with psycopg.connect(spec["dsn"], autocommit=True) as setup:
        apply_schema(setup, dimension)
    conn = psycopg.connect(spec["dsn"])
    register_vector(conn)
    channel = grpc.insecure_channel(spec["target"])
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = embedding_pb2_grpc.EmbeddingStreamServiceStub(channel)
    rss_before = rss_mib()
    rows = 0
    cpu, began = own_cpu_seconds(), time.perf_counter()
    with conn.cursor() as cur:
        for message in stub.GetEmbeddings(embedding_pb2.StreamEmbeddingRequest(chunk_size=chunk_size)):
            metadata = []
            embeddings = []
            for row in message.rows:
                metadata.append((row.id, row.company_name, row.exp_years, row.english_level, row.primary_keyword))
                embeddings.append((row.id, np.array(list(row.vector), dtype=np.float32)))
            cur.executemany(
                "INSERT INTO recruit_metadata (id, company_name, exp_years, english_level, primary_keyword) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET company_name = EXCLUDED.company_name, "
                "exp_years = EXCLUDED.exp_years, english_level = EXCLUDED.english_level, "
                "primary_keyword = EXCLUDED.primary_keyword, updated_at = now()",
                metadata,
            )
            cur.executemany(
                "INSERT INTO recruit_embedding (id, vector) VALUES (%s, %s) "
                "ON CONFLICT (id) DO UPDATE SET vector = EXCLUDED.vector, updated_at = now()",
                embeddings,
            )
            cur.execute(
                "INSERT INTO embedding_batch_checkpoint (stream_name, last_processed_uuid) VALUES ('recruit', %s) "
                "ON CONFLICT (stream_name) DO UPDATE SET last_processed_uuid = EXCLUDED.last_processed_uuid, "
                "updated_at = now()",
                (message.rows[-1].id,),
            )
            conn.commit()
            rows += len(message.rows)
    seconds, cpu = time.perf_counter() - began, own_cpu_seconds() - cpu
    channel.close()
    conn.close()
    _check_stored(spec["dsn"], int(spec["rows"]))
    return {
        "rows": rows,
        "seconds": seconds,
        "worker_cpu_seconds": cpu,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
    }


def engine(spec: Spec) -> dict[str, Any]:
    """(c) Our path: hook stream -> prefetch -> ingest_chunks with K ChunkWriters, sub-batches of S."""
    host, port = spec["target"].rsplit(":", 1)
    os.environ["AIRFLOW_CONN_EMBEDDING_GRPC_DEFAULT"] = json.dumps(
        {"conn_type": "embedding_grpc", "host": host, "port": int(port), "extra": {"timeout": 30}}
    )
    from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
    from airflow_embedding_provider.pipeline import ingest_chunks, prefetch
    from airflow_embedding_provider.storage.outbox import CacheRequest
    from airflow_embedding_provider.storage.schema import apply_schema
    from airflow_embedding_provider.storage.writer import ChunkWriter

    dimension = int(spec["dimension"])
    conns = [psycopg.connect(spec["dsn"], autocommit=True) for _ in range(int(spec["connections"]))]
    apply_schema(conns[0], dimension)
    # The operator's writers: an outbox entry for the API server's cache, one source a writer.
    writers = [
        ChunkWriter(c, dimension=dimension, cache_request=CacheRequest("recruit", f"bench/{i}"))
        for i, c in enumerate(conns)
    ]
    hook = GrpcEmbeddingHook()
    hook.wait_until_ready()
    rss_before = rss_mib()
    profile: Callable[[], None] | None = None
    if spec.get("profile"):
        profile = _start_profile()
    cpu, began = own_cpu_seconds(), time.perf_counter()
    stats = ingest_chunks(
        prefetch(hook.stream_chunks(after=None, chunk_size=int(spec["chunk_size"]))),
        writers,
        dimension=dimension,
        sub_batch_size=int(spec["sub_batch_size"]),
        origin={"bench": "engine"},
    )
    seconds, cpu = time.perf_counter() - began, own_cpu_seconds() - cpu
    if profile is not None:
        profile()
    hook.close()
    result: dict[str, Any] = {
        "rows": stats.rows_received,
        "seconds": seconds,
        "worker_cpu_seconds": cpu,
        "inserted": stats.inserted,
        "updated": stats.updated,
        "unchanged": stats.unchanged,
        "rows_dlq": stats.rows_dlq,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss_mib(),
    }
    for conn in conns:
        conn.close()
    _check_stored(spec["dsn"], int(spec["rows"]))
    return result


def sync_sample(spec: Spec) -> dict[str, Any]:
    """The sample with ``fraction`` of its rows changed (vector and metadata) and as many removed,
    both spread over the id range: the source of the range-sync measurement."""
    import pandas as pd

    out = Path(spec["sync_pkl"])
    frame = pd.read_pickle(spec["pkl"])
    rng = np.random.default_rng(int(spec["seed"]) + 2000)
    count = max(1, round(len(frame) * float(spec["fraction"])))
    picked = rng.choice(len(frame), size=2 * count, replace=False)
    changed, removed = picked[:count], picked[count:]
    if not out.exists():
        vectors = frame["job_post_vectors"].to_numpy(copy=True)
        for i in changed:
            vectors[i] = np.roll(vectors[i], 1)
        frame["job_post_vectors"] = vectors
        years = frame["Exp Years"].to_numpy(copy=True)
        years[changed] = (years[changed] + 1) % 16
        frame["Exp Years"] = years
        tmp = out.with_suffix(".tmp")
        frame.drop(frame.index[removed]).to_pickle(tmp)
        tmp.rename(out)
    return {"rows": len(frame) - count, "changed_rows": count, "removed_rows": count}


def sync(spec: Spec) -> dict[str, Any]:
    """(e) A range sync as the DAG runs it, without Airflow: plan (digests, guard), then each
    differing range: listing, diff, stream, delete. ``forced``: every range (full refresh);
    ``every_row``: stream every row of the ranges instead of only those that differ."""
    host, port = spec["target"].rsplit(":", 1)
    os.environ["AIRFLOW_CONN_EMBEDDING_GRPC_DEFAULT"] = json.dumps(
        {"conn_type": "embedding_grpc", "host": host, "port": int(port), "extra": {"timeout": 60}}
    )
    from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
    from airflow_embedding_provider.pipeline import IngestStats, ingest_chunks, prefetch
    from airflow_embedding_provider.range_sync import open_ended, plan_sync, range_inputs
    from airflow_embedding_provider.storage.outbox import CacheRequest
    from airflow_embedding_provider.storage.writer import ChunkWriter

    dimension = int(spec["dimension"])
    conns = [psycopg.connect(spec["dsn"], autocommit=True) for _ in range(int(spec["connections"]))]
    writers = [
        ChunkWriter(c, dimension=dimension, cache_request=CacheRequest("recruit", f"bench/{i}"))
        for i, c in enumerate(conns)
    ]
    hook = GrpcEmbeddingHook()
    hook.wait_until_ready()
    cpu, began = own_cpu_seconds(), time.perf_counter()
    ranges, _ = hook.plan_partitions(after=None, rows_per_partition=int(spec["rows_per_partition"]), max_partitions=64)
    plan = plan_sync(
        conns[0],
        hook,
        open_ended(ranges, None),
        forced=bool(spec.get("forced")),
        every_row=bool(spec.get("every_row")),
        max_delete_fraction=float(spec.get("max_delete_fraction", 0.2)),
    )
    planned = time.perf_counter() - began
    total = IngestStats()
    for part in plan.partitions:
        reconcile, only_ids = range_inputs(conns[0], hook, part)
        stats = ingest_chunks(
            prefetch(
                hook.stream_chunks(
                    after=part.after_uuid,
                    until=part.until_uuid,
                    chunk_size=int(spec["chunk_size"]),
                    only_ids=only_ids,
                )
            ),
            writers,
            dimension=dimension,
            sub_batch_size=int(spec["sub_batch_size"]),
            origin={"bench": "sync"},
            reconcile=reconcile,
        )
        for name in ("rows_received", "inserted", "updated", "unchanged", "rows_dlq", "deleted", "deletes_blocked"):
            setattr(total, name, getattr(total, name) + getattr(stats, name))
    seconds, cpu = time.perf_counter() - began, own_cpu_seconds() - cpu
    hook.close()
    for conn in conns:
        conn.close()
    return {
        "rows": int(spec["rows"]),
        "seconds": seconds,
        "plan_seconds": planned,
        "worker_cpu_seconds": cpu,
        "ranges": plan.ranges,
        "ranges_synced": len(plan.partitions),
        "rows_streamed": total.rows_received,
        "inserted": total.inserted,
        "updated": total.updated,
        "unchanged": total.unchanged,
        "deleted": total.deleted,
        "deletes_blocked": total.deletes_blocked,
    }


def index(spec: Spec) -> dict[str, Any]:
    """An ANN index build on a loaded table (``ensure_ann_index``), as the DAG's finalize does it;
    ``spec["method"]``: ``ivfflat`` (default) or ``hnsw``."""
    from airflow_embedding_provider.storage.schema import ensure_ann_index

    with psycopg.connect(spec["dsn"], autocommit=True) as conn:
        began = time.perf_counter()
        built = ensure_ann_index(conn, method=spec.get("method", "ivfflat"))
        seconds = time.perf_counter() - began
    if not built:
        raise SystemExit("ensure_ann_index built nothing: the table is empty or already indexed")
    return {"rows": int(spec["rows"]), "seconds": seconds, "peak_rss_mib": None}


def _start_profile() -> Callable[[], None]:
    """cProfile on every thread (writers and prefetch included); the stop function dumps stats."""
    import cProfile
    import threading

    profiles: list[cProfile.Profile] = []

    def per_thread(*_: Any) -> None:
        # First event of a new thread: swap this hook for the thread's own profiler.
        sys.setprofile(None)
        p = cProfile.Profile()
        profiles.append(p)
        p.enable()

    main = cProfile.Profile()
    profiles.append(main)
    threading.setprofile(per_thread)
    main.enable()

    def stop() -> None:
        import pstats

        threading.setprofile(None)
        for p in profiles:
            p.disable()
        stats = pstats.Stats(profiles[0])
        for p in profiles[1:]:
            stats.add(p)
        stats.dump_stats(str(Path(os.environ.get("BENCH_PROFILE_OUT", "engine.prof"))))

    return stop


def dag(spec: Spec) -> dict[str, Any]:
    """(d) ``airflow dags test recruit_embedding_ingest`` as a child: wall time and peak RSS."""
    from dev.stack import dags_test, task_result

    env = dict(spec["env"])
    began = time.perf_counter()
    dags_test(spec["dag_id"], env, conf=spec["conf"])
    seconds = time.perf_counter() - began
    final = task_result(Path(env["AIRFLOW_HOME"]), spec["dag_id"], "finalize")
    _check_stored(spec["dsn"], int(spec["rows"]))
    return {
        "rows": int(final["rows_received"]),
        "seconds": seconds,
        "run": _run_timeline(Path(env["AIRFLOW_HOME"]), spec["dag_id"]),
        "finalize": final,
        "worker_cpu_seconds": _children_cpu(),
        # The task runner is a descendant of `airflow dags test`; its peak is the largest.
        "peak_rss_mib": children_peak_rss_mib(),
    }


def _run_timeline(home: Path, dag_id: str) -> dict[str, Any]:
    """The DAG run's own duration (as the scheduler records it, without the CLI's start-up) and
    each task's seconds (mapped tasks summed), from the throwaway home's SQLite database."""
    import sqlite3
    from datetime import datetime

    def seconds(start: str, end: str) -> float:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()

    with sqlite3.connect(home / "airflow.db") as db:
        run = db.execute(
            "SELECT run_id, start_date, end_date FROM dag_run WHERE dag_id = ? ORDER BY id DESC LIMIT 1", (dag_id,)
        ).fetchone()
        tasks = db.execute(
            "SELECT task_id, start_date, end_date FROM task_instance WHERE dag_id = ? AND run_id = ?",
            (dag_id, run[0]),
        ).fetchall()
    per_task: dict[str, float] = {}
    for task_id, start, end in tasks:
        if start and end:  # a skipped task (a mapped one over nothing) never started
            per_task[task_id] = per_task.get(task_id, 0.0) + seconds(start, end)
    return {"seconds": seconds(run[1], run[2]), "tasks": {k: round(v, 2) for k, v in per_task.items()}}


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


MODES: dict[str, Callable[[Spec], dict[str, Any]]] = {
    "sample": sample,
    "sync_sample": sync_sample,
    "sync": sync,
    "ceiling": ceiling,
    "naive": naive,
    "engine": engine,
    "index": index,
    "dag": dag,
}


def main(argv: list[str], modes: dict[str, Callable[[Spec], dict[str, Any]]] = MODES) -> int:
    """``MODE SPEC_JSON OUT_JSON``: run one measurement of ``modes`` and write its result."""
    mode, spec_json, out = argv
    result = modes[mode](json.loads(spec_json))
    Path(out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
