"""``make bench``: ceiling, naive baseline, engine settings, DAG and an incremental run, in one run.

Everything runs on one embedded PostgreSQL, a fresh database a measurement, against one AI server
process over the same sample. Absolute seconds on a shared machine are noise; the ratios between
measurements taken minutes apart in the same run are the figures to read.

    python -m bench.run [--rows N] [--quick] [--pairs N] [--dag-rounds N] [--load-rounds N] [--noop-rounds N]
                        [--scheduler-connections N] [--scheduler-budget N] [--hnsw] [--skip naive,settings,dag,incremental,sync,scheduler]

The RSS target compares WORKDIR/result-100000.json with result-1000000.json (this run or stored).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from airflow_embedding_provider.partitions import DEFAULT_MAX_PARTITIONS, DEFAULT_ROWS_PER_PARTITION, partition_count
from airflow_embedding_provider.pipeline import DEFAULT_SUB_BATCH_SIZE, default_chunk_size
from airflow_embedding_provider.rows import DEFAULT_DIMENSION
from bench.chart import write_chart
from bench.host_speed import probe_ms
from bench.measure import TINY_ROWS
from bench.procmem import peak_rss_mib, rss_mib, tree_cpu_seconds
from bench.queryable import round_keys
from bench.report import render, rss_runs, targets
from dev.embedded_postgres import EmbeddedPostgres
from dev.stack import REPO_ROOT, ServerProcess, airflow_env, prepare_airflow_home

DEFAULT_ROWS = 141_897  # the seed's own figure
DAG_ID = "recruit_embedding_ingest"
SEED = 7
CHANGED_FRACTION = 0.10
#: Rounds of target 1 and of target 3's first load and no-op figure, each read as the median
#: (bench/queryable.py, bench/scheduler.py).
DEFAULT_ROUNDS = 3
SKIPPABLE = ("naive", "settings", "dag", "incremental", "sync", "scheduler")
#: The range-sync measurement's source: this share of rows changed and as many removed.
SYNC_FRACTION = 0.01


@dataclass(frozen=True)
class EngineSetting:
    chunk_size: int
    sub_batch_size: int
    connections: int

    @property
    def label(self) -> str:
        return f"chunk {self.chunk_size}, sub-batch {self.sub_batch_size}, {self.connections} conn"

    @property
    def key(self) -> str:
        return f"engine_c{self.chunk_size}_s{self.sub_batch_size}_k{self.connections}"


# The DAG's defaults at 384-d (chunk 1000, sub-batch 1000, 4 connections): the engine figure the ratios use.
DEFAULT_SETTING = EngineSetting(default_chunk_size(DEFAULT_DIMENSION), DEFAULT_SUB_BATCH_SIZE, 4)
OTHER_SETTINGS = (
    EngineSetting(300, 100, 4),  # the seed's suggested 50-100 rows a transaction
    EngineSetting(300, 300, 4),  # the defaults until 2026-12-01
    EngineSetting(1000, 300, 4),
    EngineSetting(1000, 1000, 2),
    EngineSetting(1000, 1000, 1),
)


class Bench:
    def __init__(self, workdir: Path, rows: int) -> None:
        #: pids whose CPU (with descendants) is charged to each measurement: PostgreSQL, AI server.
        self.cpu_pids: dict[str, int] = {}
        self.workdir = workdir
        self.rows = rows
        self.log_path = workdir / f"bench-{rows}.log"
        self.measurements: dict[str, dict[str, Any]] = {}

    def child(
        self, mode: str, key: str, spec: dict[str, Any], *, module: str = "bench.measure", **extra: Any
    ) -> dict[str, Any]:
        """Run ``module`` (``bench.measure`` or another with the same command line) in a fresh
        process; its result, with the load around it."""
        out = self.workdir / f"{key}.json"
        out.unlink(missing_ok=True)
        load = os.getloadavg()[0]
        speed_before = probe_ms()
        cpu_before = {name: tree_cpu_seconds(pid) for name, pid in self.cpu_pids.items()}
        with open(self.log_path, "ab") as log:
            log.write(f"\n== {key} ({mode}) ==\n".encode())
            log.flush()
            proc = subprocess.run(
                [sys.executable, "-m", module, mode, json.dumps(spec), str(out)],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if proc.returncode != 0:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"measurement {key} failed (exit {proc.returncode}); log {self.log_path}:\n{tail}")
        result: dict[str, Any] = json.loads(out.read_text())
        out.unlink()
        for name, pid in self.cpu_pids.items():
            before, after = cpu_before.get(name), tree_cpu_seconds(pid)
            if before is not None and after is not None:
                result[f"{name}_cpu_seconds"] = after - before
        result.update(extra, mode=mode, load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2))
        # The machine's speed around the measurement (bench/host_speed.py): lower is faster.
        result.update(probe_ms_before=round(speed_before, 1), probe_ms_after=round(probe_ms(), 1))
        if "seconds" in result and result.get("rows"):
            result["rows_per_second"] = result["rows"] / result["seconds"]
            print(
                f"  {key:<28} {result['rows']:>9} rows {result['seconds']:8.2f} s "
                f"{result['rows_per_second']:>9.0f} rows/s   (load {load:.1f})",
                flush=True,
            )
        self.measurements[key] = result
        # Kept as they come: a long run stopped part-way still leaves its figures.
        (self.workdir / f"partial-{self.rows}.json").write_text(json.dumps(self.measurements, indent=2))
        return result


def sync_measurements(
    bench: Bench, common: dict[str, Any], fresh_db: Callable[[], str], pkl: Path, stack: ExitStack
) -> None:
    """Range sync after a first load (engine, then the ivfflat index) of its own database: a
    scheduled run when nothing changed, a full refresh when nothing changed, every range streamed
    whole (what not splitting a differing range costs), then 1% changed and 1% removed."""
    workdir = bench.workdir
    sync_pkl = workdir / f"{pkl.stem}-sync{round(SYNC_FRACTION * 100)}pct.pkl"
    sample = bench.child(
        "sync_sample",
        "sync_sample",
        {"pkl": str(pkl), "sync_pkl": str(sync_pkl), "seed": SEED, "fraction": SYNC_FRACTION},
    )
    dsn = fresh_db()
    setting = {
        "chunk_size": DEFAULT_SETTING.chunk_size,
        "sub_batch_size": DEFAULT_SETTING.sub_batch_size,
        "connections": DEFAULT_SETTING.connections,
        "rows_per_partition": DEFAULT_ROWS_PER_PARTITION,  # the DAG's default
    }
    bench.child("engine", "sync_first_load", {**common, **setting, "dsn": dsn}, setting=DEFAULT_SETTING.label)
    bench.child("index", "sync_first_load_ivfflat", {"dsn": dsn, "rows": bench.rows})
    source = {**common, **setting, "dsn": dsn}
    bench.child("sync", "sync_unchanged", source)
    bench.child("sync", "sync_full_refresh_unchanged", {**source, "forced": True})
    bench.child("sync", "sync_every_row_unchanged", {**source, "forced": True, "every_row": True})
    ai = ServerProcess(["ai-server", "--pkl", str(sync_pkl)], log_path=workdir / "ai-server.log")
    ai.start(timeout=600)
    stack.callback(ai.stop)
    bench.child(
        "sync",
        "sync_1pct_changed_1pct_removed",
        {**source, "target": ai.target, "rows": sample["rows"]},
        expected_changed=sample["changed_rows"],
        expected_removed=sample["removed_rows"],
    )
    ai.stop()
    m = bench.measurements
    load = m["sync_first_load"]["seconds"]
    ceiling = m["ceiling"]["seconds"] + m["ivfflat_build"]["seconds"]
    print("range sync (seconds; x first load; x load-until-queryable ceiling = COPY both tables + ivfflat):")
    for key in (
        "sync_unchanged",
        "sync_full_refresh_unchanged",
        "sync_every_row_unchanged",
        "sync_1pct_changed_1pct_removed",
    ):
        r = m[key]
        r["x_first_load"] = r["seconds"] / load
        r["x_ceiling"] = r["seconds"] / ceiling
        print(
            f"  {key:<34} {r['seconds']:7.2f} s  {r['x_first_load']:5.2f}x load  {r['x_ceiling']:5.2f}x ceiling  "
            f"ranges {r['ranges_synced']}/{r['ranges']}, streamed {r['rows_streamed']}, "
            f"{r['inserted']} new, {r['updated']} changed, {r['deleted']} deleted",
            flush=True,
        )


def dag_variants(rows: int) -> list[tuple[str, int | None]]:
    """The DAG runs of a bench, each ``(key, rows_per_partition)``: the DAG's defaults first (the
    figure of target 1; ``None`` sends no ``rows_per_partition``), then the other of one partition
    and four (four mapped tasks, the scheduler's parallelism), whichever the default does not plan."""
    planned = partition_count(rows, DEFAULT_ROWS_PER_PARTITION, DEFAULT_MAX_PARTITIONS)
    other = ("dag_one_partition", max(100, rows)) if planned != 1 else ("dag_partitions", max(100, math.ceil(rows / 4)))
    return [("dag_default", None), other]


def _drop_databases(pg: EmbeddedPostgres, names: list[str]) -> None:
    with psycopg.connect(pg.dsn(), autocommit=True) as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "commit": commit,
        "load_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS)
    parser.add_argument("--quick", action="store_true", help="only the default engine setting, no DAG runs")
    parser.add_argument(
        "--pairs",
        type=int,
        default=2,
        help="extra (ceiling, naive, default engine) rounds measured back to back; c/a and c/b take the median",
    )
    parser.add_argument(
        "--dag-rounds",
        type=int,
        default=None,
        help="rounds of target 1 (load-until-queryable ceiling, first load, no-op run back to back); "
        f"the target takes the median (default {DEFAULT_ROUNDS}, 1 with --quick)",
    )
    parser.add_argument(
        "--load-rounds",
        type=int,
        default=None,
        help="first loads of target 3 under the real scheduler, each into an empty database; the "
        f"target takes the median (default {DEFAULT_ROUNDS}, 1 with --quick)",
    )
    parser.add_argument(
        "--scheduler-connections",
        type=int,
        default=DEFAULT_SETTING.connections,
        help="RECRUIT_EMBEDDING_DB_CONNECTIONS under the real scheduler: writers a mapped task "
        f"(default {DEFAULT_SETTING.connections}, the DAG's; the four tasks of a 1M load run side by side)",
    )
    parser.add_argument(
        "--scheduler-budget",
        type=int,
        default=None,
        help="RECRUIT_EMBEDDING_DB_WRITER_BUDGET under the real scheduler: the most writers of all "
        "tasks at once (default the DAG's, one task's writers: --scheduler-connections; 0 = none)",
    )
    parser.add_argument(
        "--noop-rounds",
        type=int,
        default=None,
        help="scheduled minutes of target 3's no-op run and empty DAG; the target takes the median "
        f"(default {DEFAULT_ROUNDS}, 1 with --quick)",
    )
    parser.add_argument(
        "--hnsw", action="store_true", help="also time an HNSW build at the end (90 to 120 s at 141,897 rows here)"
    )
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {', '.join(SKIPPABLE)}")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".bench")
    args = parser.parse_args(argv)
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = args.skip - set(SKIPPABLE)
    if unknown:
        parser.error(f"unknown --skip part(s) {sorted(unknown)}; choose from {', '.join(SKIPPABLE)}")
    if args.quick:
        args.skip |= {"settings", "dag"}
    if args.scheduler_connections < 1:
        parser.error("--scheduler-connections must be 1 or more")
    if args.scheduler_budget is None:
        args.scheduler_budget = args.scheduler_connections
    if args.scheduler_budget < 0:
        parser.error("--scheduler-budget must be 0 (none) or more")
    if args.pairs < 0:
        parser.error("--pairs must be 0 or more")
    # A quick run measures each figure once: a scheduled minute a round is a minute of waiting.
    for name in ("dag_rounds", "load_rounds", "noop_rounds"):
        if getattr(args, name) is None:
            setattr(args, name, 1 if args.quick else DEFAULT_ROUNDS)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    if args.rows < 1000:
        parser.error("--rows must be at least 1000")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    rows = args.rows
    bench = Bench(workdir, rows)
    bench.log_path.unlink(missing_ok=True)
    started = dt.datetime.now(dt.timezone.utc)
    began = time.monotonic()
    machine = _machine()
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"bench: {rows} rows, {machine['cpus']} CPUs, load {machine['load_at_start']}; log {bench.log_path}")
    pkl = workdir / f"sample-{rows}-seed{SEED}-clustered.pkl"
    changed_pkl = workdir / f"sample-{rows}-seed{SEED}-clustered-changed{round(CHANGED_FRACTION * 100)}.pkl"
    tiny_pkl = workdir / f"sample-{TINY_ROWS}-seed{SEED}.pkl"
    ai_memory: dict[str, Any] = {}
    with ExitStack() as stack:
        sample = bench.child(
            "sample",
            "sample",
            {
                "rows": rows,
                "pkl": str(pkl),
                "changed_pkl": str(changed_pkl),
                "tiny_pkl": str(tiny_pkl),
                "seed": SEED,
                "changed_fraction": CHANGED_FRACTION,
            },
        )
        changed_rows = sample["changed_rows"] or max(1, round(rows * CHANGED_FRACTION))
        pg = EmbeddedPostgres(workdir / "pgdata")
        pg.start()
        stack.callback(pg.stop)
        bench.cpu_pids["pg"] = pg.pid
        databases = iter(range(1, 100))
        created: list[str] = []
        kept: set[str] = set()
        # Dropped at the end (before the server stops): at 1M rows each holds gigabytes.
        stack.callback(_drop_databases, pg, created)

        def fresh_db(*, keep: bool = False, retire: bool = True) -> str:
            """A new database for the next measurement. First the finished measurements' databases
            are dropped (``retire``), but for those made with ``keep`` (read again later): left in
            place, autovacuum vacuums each freshly loaded table (about 10 s a table at 141,897
            rows) during the measurements after it (bench/RESULTS.md)."""
            if retire:
                _drop_databases(pg, [name for name in created if name not in kept])
                created[:] = [name for name in created if name in kept]
            created.append(f"bench_{next(databases)}")
            if keep:
                kept.add(created[-1])
            return pg.create_database(created[-1])

        print("measuring:")
        bench.child("ceiling", "ceiling", {"dsn": fresh_db(), "pkl": str(pkl), "workdir": str(workdir)})

        def queryable_ceiling(key: str) -> None:
            """Load until queryable: the same COPY, then the ivfflat build the DAG's finalize does."""
            bench.child(
                "queryable_ceiling",
                key,
                {"dsn": fresh_db(), "pkl": str(pkl), "workdir": str(workdir)},
                module="bench.queryable",
            )

        queryable_ceiling(round_keys(1)[0])

        # The AI server's fixed cost, to tell the data's share of its RSS from the interpreter's.
        with ServerProcess(["ai-server", "--pkl", str(tiny_pkl)], log_path=workdir / "ai-server.log") as tiny:
            assert tiny.proc is not None
            ai_memory["fixed_rss_mib"] = rss_mib(tiny.proc.pid)
        ai = ServerProcess(["ai-server", "--pkl", str(pkl)], log_path=workdir / "ai-server.log")
        ai.start(timeout=600)
        stack.callback(ai.stop)
        assert ai.proc is not None
        ai_pid = ai.proc.pid
        bench.cpu_pids["ai"] = ai_pid
        ai_memory["rss_after_load_mib"] = rss_mib(ai_pid)
        common = {"target": ai.target, "dimension": DEFAULT_DIMENSION, "rows": rows}

        def naive(key: str) -> None:
            if "naive" not in args.skip:
                bench.child("naive", key, {**common, "dsn": fresh_db(), "chunk_size": DEFAULT_SETTING.chunk_size})

        naive("naive")

        def engine(setting: EngineSetting, dsn: str, key: str | None = None, **spec: Any) -> dict[str, Any]:
            return bench.child(
                "engine",
                key or setting.key,
                {
                    **common,
                    "dsn": dsn,
                    "chunk_size": setting.chunk_size,
                    "sub_batch_size": setting.sub_batch_size,
                    "connections": setting.connections,
                    **spec,
                },
                setting=setting.label + (f", pair {key.rsplit('_', 1)[1]}" if key else ""),
            )

        # The default setting's database keeps its load and gets the ivfflat index: the
        # incremental run starts from it.
        loaded_dsn = fresh_db(keep=True)
        engine(DEFAULT_SETTING, loaded_dsn)
        # Its own measurement, so that the engine's CPU figures leave the index build out.
        bench.child("index", "ivfflat_build", {"dsn": loaded_dsn, "rows": rows})
        with psycopg.connect(loaded_dsn, autocommit=True) as conn:
            # What autovacuum would do to the freshly loaded tables, done now rather than during
            # the measurements until the incremental run reads this database again.
            conn.execute("VACUUM ANALYZE")
        if "settings" not in args.skip:
            for setting in OTHER_SETTINGS:
                engine(setting, fresh_db())
        # The ceiling, the naive baseline and the engine again, back to back, so that c/a and c/b
        # come from measurements under the same load (the first ceiling is minutes before its engine).
        for k in range(2, 2 + args.pairs):
            bench.child("ceiling", f"ceiling_{k}", {"dsn": fresh_db(), "pkl": str(pkl), "workdir": str(workdir)})
            naive(f"naive_{k}")
            engine(DEFAULT_SETTING, fresh_db(), key=f"{DEFAULT_SETTING.key}_{k}")

        if not {"dag", "scheduler"} <= args.skip:
            api = ServerProcess(["api-server"], log_path=workdir / "api-server.log")
            api.start()
            stack.callback(api.stop)
        if "dag" not in args.skip:
            home = workdir / f"airflow-home-{rows}"
            shutil.rmtree(home, ignore_errors=True)
            stack.callback(shutil.rmtree, home, ignore_errors=True)

            def dag_spec(conf: dict[str, Any]) -> dict[str, Any]:
                """A DAG run's spec on a fresh database; the throwaway home is migrated once."""
                dsn = fresh_db()
                env = airflow_env(
                    home,
                    postgres_dsn=dsn,
                    embedding_target=ai.target,
                    cache_target=api.target,
                    extra={
                        "RECRUIT_EMBEDDING_RETRIES": "0",  # a failure shows at once, not after back-off
                        "RECRUIT_EMBEDDING_DB_CONNECTIONS": str(DEFAULT_SETTING.connections),
                    },
                )
                if not (home / "airflow.db").exists():
                    prepare_airflow_home(env)  # not timed: a deployment migrates once
                return {"env": env, "dag_id": DAG_ID, "conf": conf, "dsn": dsn, "rows": rows}

            for key, per_partition in dag_variants(rows):
                # The DAG's own chunk and sub-batch; the partitions its default plans, or another count.
                conf = {} if per_partition is None else {"rows_per_partition": per_partition}
                spec = dag_spec(conf)
                bench.child("dag", key, spec, conf=conf)
                if key == "dag_default":
                    # The same DAG again on the loaded database: a run that finds nothing new.
                    bench.child("dag_noop", "dag_noop", spec, module="bench.queryable", conf=conf)
            # Target 1's later rounds, each back to back: the ceiling, a first load, its no-op run.
            for k in range(2, 1 + args.dag_rounds):
                ceiling_key, load_key, noop_key = round_keys(k)
                queryable_ceiling(ceiling_key)
                spec = dag_spec({})
                bench.child("dag", load_key, spec, conf={})
                bench.child("dag_noop", noop_key, spec, module="bench.queryable", conf={})

        if "scheduler" not in args.skip:
            bench.child(
                "scheduler",
                "scheduler",
                {
                    "home": str(workdir / f"airflow-cluster-{rows}"),
                    "dags_folder": str(REPO_ROOT / "dags"),
                    "dsn": fresh_db(),
                    "metadata_dsn": fresh_db(retire=False).replace("postgresql://", "postgresql+psycopg://"),
                    "target": ai.target,
                    "cache_target": api.target,
                    "connections": args.scheduler_connections,
                    "writer_budget": args.scheduler_budget,
                    "rows": rows,
                    "conf": {},  # the DAG's defaults, as a scheduled run has them
                    "load_rounds": args.load_rounds,
                    "noop_rounds": args.noop_rounds,
                },
                module="bench.scheduler",
            )

        if "sync" not in args.skip:
            sync_measurements(bench, common, fresh_db, pkl, stack)

        ai_memory["rss_after_streams_mib"] = rss_mib(ai_pid)
        ai_memory["peak_rss_mib"] = peak_rss_mib(ai_pid)
        ai.stop()
        del bench.cpu_pids["ai"]

        if "incremental" not in args.skip:
            # The same ids with 10% of rows changed, after the full load, with the ivfflat index.
            ai2 = ServerProcess(["ai-server", "--pkl", str(changed_pkl)], log_path=workdir / "ai-server.log")
            ai2.start(timeout=600)
            stack.callback(ai2.stop)
            assert ai2.proc is not None
            bench.cpu_pids["ai"] = ai2.proc.pid
            bench.child(
                "engine",
                "incremental",
                {
                    **common,
                    "target": ai2.target,
                    "dsn": loaded_dsn,
                    "chunk_size": DEFAULT_SETTING.chunk_size,
                    "sub_batch_size": DEFAULT_SETTING.sub_batch_size,
                    "connections": DEFAULT_SETTING.connections,
                },
                setting=DEFAULT_SETTING.label + ", ivfflat present",
                expected_changed=changed_rows,
            )
            ai2.stop()

        if args.hnsw:
            # On the loaded table, as a run with the other setting would: builds HNSW, drops ivfflat.
            bench.child("index", "hnsw_build", {"dsn": loaded_dsn, "rows": rows, "method": "hnsw"})

    ai_memory["matrix_mib"] = rows * DEFAULT_DIMENSION * 4 / 2**20
    result: dict[str, Any] = {
        "rows": rows,
        "dimension": DEFAULT_DIMENSION,
        "command": command.strip(),
        "started_utc": started.isoformat(timespec="seconds"),
        "wall_seconds": round(time.monotonic() - began, 1),
        "machine": machine | {"load_at_end": [round(x, 2) for x in os.getloadavg()]},
        "default_engine": DEFAULT_SETTING.key,
        "measurements": bench.measurements,
        "ai_server": ai_memory,
    }
    result["targets"] = targets(result, rss_runs=rss_runs(result, workdir))
    out = workdir / f"result-{rows}.json"
    out.write_text(json.dumps(result, indent=2))
    table = render(result)
    (workdir / f"result-{rows}.md").write_text(table)
    print(f"chart: {write_chart(result, workdir / f'result-{rows}.png')}")
    print()
    print(table)
    print(f"result: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
