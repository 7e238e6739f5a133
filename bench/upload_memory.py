"""Backpressure of the upload server: its memory stays flat with upload size, a fast client is held back.

For each size, a fresh ``airflow-embedding upload-server`` process over a fresh database receives
one upload from a client that can produce chunks far faster than PostgreSQL stores them. Sampled
meanwhile: the server's RSS (``/proc``), and the client's lead, the rows it has handed to gRPC
minus the rows committed. A bounded lead and a send rate equal to the store rate are the
backpressure; a flat RSS is what it buys.

Run: ``python -m bench.upload_memory [--sizes 20000 200000] [--dsn DSN]``; without ``--dsn`` an
embedded PostgreSQL is started in a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

from airflow_embedding_provider.rows import DEFAULT_DIMENSION
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES
from airflow_embedding_provider.upload_server.client import upload
from airflow_embedding_provider.wire.codec import encode_rows
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes
from bench.procmem import rss_mib
from dev.embedded_postgres import EmbeddedPostgres
from dev.sample import uuid7_strings
from dev.stack import ServerProcess

CHUNK = 300
SAMPLE_EVERY = 0.05
#: One serialized row: 4 bytes a float plus about 100 bytes of id and metadata.
ROW_BYTES = 4 * DEFAULT_DIMENSION + 100


@dataclass
class Run:
    rows: int
    seconds: float = 0.0
    baseline_mib: float = 0.0
    peak_mib: float = 0.0
    produce_rows_per_s: float = 0.0
    max_lead_rows: int = 0
    rss: list[float] = field(default_factory=list)

    @property
    def growth_mib(self) -> float:
        return self.peak_mib - self.baseline_mib

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds else 0.0


class FastClient:
    """Chunks of fresh ids over one precomputed vector block: producing them costs next to nothing,
    so the client would run far ahead of the server if nothing held it back."""

    def __init__(self, rows: int, seed: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.ids = uuid7_strings(rows, rng)
        self.block = rng.standard_normal((CHUNK, DEFAULT_DIMENSION), dtype=np.float32)
        self.sent = 0

    def chunk(self, start: int) -> RowChunkBytes:
        ids = self.ids[start : start + CHUNK]
        n = len(ids)
        return encode_rows(ids, ["Bench Co"] * n, [3] * n, ["upper"] * n, ["Python"] * n, self.block[:n])

    def chunks(self) -> Iterator[RowChunkBytes]:
        for start in range(0, len(self.ids), CHUNK):
            message = self.chunk(start)
            yield message
            # Counted once gRPC asks for the next message: this one has been handed to the transport.
            self.sent = start + len(message.rows)

    def production_rate(self, sample_rows: int = 30_000) -> float:
        """Rows a second the client produces and serializes when nothing waits on it."""
        began = time.perf_counter()
        for start in range(0, min(sample_rows, len(self.ids)), CHUNK):
            self.chunk(start).SerializeToString()
        return min(sample_rows, len(self.ids)) / (time.perf_counter() - began)


def committed_rows(conn: psycopg.Connection) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM recruit_metadata")).fetchone()
    return int(row[0]) if row else 0


def measure(dsn: str, rows: int, log_dir: Path) -> Run:
    run = Run(rows=rows)
    client = FastClient(rows)
    run.produce_rows_per_s = client.production_rate()
    server = ServerProcess(["upload-server", "--postgres-dsn", dsn], log_path=log_dir / f"server-{rows}.log")
    with server, psycopg.connect(dsn, autocommit=True) as conn:
        assert server.proc is not None
        pid = server.proc.pid
        # Warm-up upload of one chunk: connections, staging tables and allocator pools exist before
        # the baseline is read, as on a server that has served before.
        warm = FastClient(CHUNK, seed=99)
        upload(server.target, warm.chunks(), upload_id="warm-up")
        run.baseline_mib = rss_mib(pid) or 0.0
        done = threading.Event()

        def sample() -> None:
            with psycopg.connect(dsn, autocommit=True) as watch:
                last_count = 0.0
                while not done.is_set():
                    run.rss.append(rss_mib(pid) or 0.0)
                    now = time.monotonic()
                    if now - last_count > 0.25:  # count(*) is not free: four times a second
                        run.max_lead_rows = max(run.max_lead_rows, client.sent - (committed_rows(watch) - CHUNK))
                        last_count = now
                    time.sleep(SAMPLE_EVERY)

        sampler = threading.Thread(target=sample, daemon=True)
        began = time.monotonic()
        sampler.start()
        try:
            result = upload(server.target, client.chunks(), upload_id=f"bench-{rows}")
        finally:
            run.seconds = time.monotonic() - began
            done.set()
            sampler.join()
        if not result.success or result.total_rows != rows:
            raise RuntimeError(f"upload failed: {result.message}")
        if committed_rows(conn) != rows + CHUNK:
            raise RuntimeError("not every row was stored")
    run.peak_mib = max(run.rss, default=run.baseline_mib)
    return run


def report(runs: list[Run]) -> str:
    lines = [
        "| rows | seconds | stored rows/s | client could produce rows/s | max lead (rows / MiB) | "
        "server RSS before | server RSS peak | growth |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lead_mib = r.max_lead_rows * ROW_BYTES / 2**20
        lines.append(
            f"| {r.rows:,} | {r.seconds:.1f} | {r.rows_per_s:,.0f} | {r.produce_rows_per_s:,.0f} | "
            f"{r.max_lead_rows:,} / {lead_mib:.1f} | {r.baseline_mib:.0f} MiB | {r.peak_mib:.0f} MiB | "
            f"{r.growth_mib:+.0f} MiB |"
        )
    if len(runs) >= 2:
        small, large = runs[0], runs[-1]
        lines.append("")
        lines.append(
            f"{large.rows / small.rows:.0f}x the rows: server RSS growth {small.growth_mib:+.0f} -> "
            f"{large.growth_mib:+.0f} MiB, max client lead {small.max_lead_rows:,} -> {large.max_lead_rows:,} rows; "
            f"the client sent at the store rate ({large.rows_per_s:,.0f} rows/s), "
            f"{large.produce_rows_per_s / max(large.rows_per_s, 1):.0f}x slower than it could produce."
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _database(dsn: str | None) -> Iterator[EmbeddedPostgres | None]:
    if dsn:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="embedded-pg-"))  # not 0700: PostgreSQL may run as another user
    server = EmbeddedPostgres(folder / "data").start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upload_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--dsn", help="an existing PostgreSQL with pgvector; its tables are dropped per size")
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="upload-bench-"))
    runs: list[Run] = []
    with _database(args.dsn) as pg:
        for rows in args.sizes:
            if pg is not None:
                dsn = pg.create_database(f"upload_bench_{rows}")
            else:
                dsn = args.dsn
                with psycopg.connect(dsn, autocommit=True) as conn:
                    tables = sql.SQL(", ").join(map(sql.Identifier, dataclasses.astuple(DEFAULT_TABLES)))
                    conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(tables))
            runs.append(measure(dsn, rows, log_dir))
            print(f"{rows:,} rows: done in {runs[-1].seconds:.1f} s", flush=True)
    print(report(runs))
    print(f"server logs: {log_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
