"""CPU a row of the engine, per process: ``python -m bench.cpu_split [--rows N] [--rounds K] [--py-spy DIR]``.

Runs the default engine measurement (``bench.measure engine`` with the DAG's defaults,
``bench.run.DEFAULT_SETTING``) ``--rounds`` times against one AI server, each round on a fresh embedded PostgreSQL,
and prints the CPU seconds (user + system) a row of the worker (the ingesting process, timed part
only), the AI server and every PostgreSQL process. ``--ceiling`` adds, after each round, the COPY
ceiling of the same rows (``bench.measure ceiling``) with PostgreSQL's CPU a row: what the
engine asks of PostgreSQL beyond the ceiling, measured. CPU, unlike wall time, hardly moves when
another process shares the cores, so two commits can be compared on a busy machine by running
this on each in turn. With ``--py-spy DIR`` (``pip install py-spy``) the last round also records
both Python processes, GIL holders only, as raw stacks: ``DIR/worker.txt`` and ``DIR/ai.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from airflow_embedding_provider.rows import DEFAULT_DIMENSION
from bench.procmem import tree_cpu_seconds
from bench.run import DEFAULT_ROWS, DEFAULT_SETTING, SEED
from dev.embedded_postgres import EmbeddedPostgres
from dev.stack import REPO_ROOT, ServerProcess

PY_SPY_RATE = 250  # samples a second


def _py_spy(out: Path) -> list[str]:
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return [exe, "record", "--nonblocking", "--gil", "-r", str(PY_SPY_RATE), "-f", "raw", "-o", str(out)]


def engine_sample(workdir: Path, rows: int) -> Path:
    """The sample these CPU measurements stream, written once into ``workdir``: the seed's layout,
    not clustered (the engine's cost a row does not depend on what the vectors hold)."""
    pkl = workdir / f"sample-{rows}-seed{SEED}.pkl"
    if not pkl.exists():
        from dev.sample import write_sample

        write_sample(pkl, rows, seed=SEED, layout="seed")
    return pkl


@contextlib.contextmanager
def fresh_server(workdir: Path) -> Iterator[tuple[EmbeddedPostgres, Path]]:
    """An embedded PostgreSQL in a folder of its own under ``workdir``, and that folder, removed
    afterwards: each measurement starts on an empty server."""
    folder = Path(tempfile.mkdtemp(prefix="cpu-split-pg-", dir=workdir))
    try:
        with EmbeddedPostgres(folder / "data") as pg:
            yield pg, folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def ceiling_round(workdir: Path, pkl: Path, rows: int) -> dict[str, float]:
    """The COPY ceiling (``bench.measure ceiling``: pre-encoded rows, one connection) on a fresh
    server, with the CPU a row of the COPYing process and of PostgreSQL over its timed part."""
    with fresh_server(workdir) as (pg, folder):
        pg_pid = pg.pid
        spec = {"pkl": str(pkl), "workdir": str(folder), "dsn": pg.create_database("cpu_split")}
        out = folder / "ceiling.json"
        command = [sys.executable, "-m", "bench.measure", "ceiling", json.dumps(spec), str(out)]
        # PostgreSQL's CPU from before the encoding to after the COPY: the encoding is the
        # bench process's own, so PostgreSQL only adds its idle background work to the figure.
        pg_cpu, load = tree_cpu_seconds(pg_pid), os.getloadavg()[0]
        subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        pg_after = tree_cpu_seconds(pg_pid)
        result = json.loads(out.read_text())
    n = int(result["rows"])
    assert pg_cpu is not None and pg_after is not None
    return {
        "rows_per_second": n / result["seconds"],
        "worker_us": result["worker_cpu_seconds"] / n * 1e6,
        "pg_us": (pg_after - pg_cpu) / n * 1e6,
        "load": load,
    }


def one_round(ai: ServerProcess, ai_pid: int, workdir: Path, rows: int, spy: Path | None) -> dict[str, float]:
    with fresh_server(workdir) as (pg, folder):
        pg_pid = pg.pid
        spec = {
            "target": ai.target,
            "dimension": DEFAULT_DIMENSION,
            "rows": rows,
            "dsn": pg.create_database("cpu_split"),
            "chunk_size": DEFAULT_SETTING.chunk_size,
            "sub_batch_size": DEFAULT_SETTING.sub_batch_size,
            "connections": DEFAULT_SETTING.connections,
        }
        out = folder / "engine.json"
        command = [sys.executable, "-m", "bench.measure", "engine", json.dumps(spec), str(out)]
        recorder = None
        if spy is not None:
            command = [*_py_spy(spy / "worker.txt"), "--", *command]
            recorder = subprocess.Popen(
                [*_py_spy(spy / "ai.txt"), "--pid", str(ai_pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)  # attached before the stream starts
        pg_cpu, ai_cpu, load = tree_cpu_seconds(pg_pid), tree_cpu_seconds(ai_pid), os.getloadavg()[0]
        subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
        pg_after, ai_after = tree_cpu_seconds(pg_pid), tree_cpu_seconds(ai_pid)
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            recorder.wait(timeout=60)
        result = json.loads(out.read_text())
    n = int(result["rows"])
    assert pg_cpu is not None and ai_cpu is not None and pg_after is not None and ai_after is not None
    return {
        "rows_per_second": n / result["seconds"],
        "worker_us": result["worker_cpu_seconds"] / n * 1e6,
        "ai_us": (ai_after - ai_cpu) / n * 1e6,
        "pg_us": (pg_after - pg_cpu) / n * 1e6,
        "load": load,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--py-spy", type=Path, default=None, dest="spy")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".bench")
    parser.add_argument(
        "--ceiling", action="store_true", help="after each round, the COPY ceiling's CPU a row on a fresh server too"
    )
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    pkl = engine_sample(workdir, args.rows)
    if args.spy is not None:
        args.spy.mkdir(parents=True, exist_ok=True)
    ai = ServerProcess(["ai-server", "--pkl", str(pkl)], log_path=workdir / "ai-server.log")
    ai.start(timeout=600)
    try:
        assert ai.proc is not None
        print(f"{args.rows:,} rows; CPU us a row (user + system) of each process, engine defaults:")
        for k in range(args.rounds):
            spy = args.spy if k == args.rounds - 1 else None
            r = one_round(ai, ai.proc.pid, workdir, args.rows, spy)
            total = r["worker_us"] + r["ai_us"] + r["pg_us"]
            print(
                f"  round {k + 1}: {r['rows_per_second']:>7,.0f} rows/s  worker {r['worker_us']:5.1f}  "
                f"AI server {r['ai_us']:4.1f}  PostgreSQL {r['pg_us']:5.1f}  total {total:5.1f}  "
                f"(load {r['load']:.1f}){'  py-spy' if spy else ''}",
                flush=True,
            )
            if args.ceiling:
                c = ceiling_round(workdir, pkl, args.rows)
                print(
                    f"  ceiling {k + 1}: {c['rows_per_second']:>7,.0f} rows/s  COPY client {c['worker_us']:4.1f}  "
                    f"PostgreSQL {c['pg_us']:5.1f}  (load {c['load']:.1f})",
                    flush=True,
                )
    finally:
        ai.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
