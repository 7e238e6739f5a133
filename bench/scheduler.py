"""The DAG under the real scheduler: LocalExecutor (parallelism 4), a PostgreSQL metadata database,
api-server, scheduler and dag-processor as processes (``dev.airflow_cluster``), as the
scheduler integration test runs them.

One measurement, in its own process (``python -m bench.scheduler scheduler SPEC_JSON OUT_JSON``):

0. one triggered run of the empty DAG (below), not timed: the api-server's first task call builds
   its execution API's routes, a one-off a running deployment has behind it;
1. a first load, ``load_rounds`` times: a run of ``recruit_embedding_ingest`` triggered through
   the REST API into an empty database (made anew before each round after the first); its
   duration as Airflow records it (``start_date`` to ``end_date``) is read against the same bench
   run's engine seconds plus its ivfflat build, and the target takes the median round;
2. then both DAGs get a one-minute schedule: each minute the scheduler starts a run of the ingest
   DAG that finds nothing new, and a run of ``bench/dags/bench_empty_ingest_shape.py`` (the same
   five-task shape doing nothing); the first's duration is read against the second's, minute by
   minute, for ``noop_rounds`` minutes, and the target takes the median.

Why rounds: Airflow's task supervisor sometimes notices its task process's exit only at its next
wake-up, ``[workers] min_heartbeat_interval`` (5 s) later. Until then the executor slot stays
taken, and a task that skips reports its state only then, so a run of this shape takes 4-5 s or
9-10 s by chance (bench/RESULTS.md). In a first load of four partitions on four slots, a late
exit of ``plan_partitions`` holds back the fourth ``ingest`` by up to 5 s. Each timing counts its
``late_exits``: task processes whose workload ended more than ``LATE_EXIT_SECONDS`` after the
task's last log line.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.measure import Spec, _check_stored, lower_median

INGEST_DAG = "recruit_embedding_ingest"
EMPTY_DAG = "bench_empty_ingest_shape"
EMPTY_DAG_FILE = Path(__file__).with_name("dags") / f"{EMPTY_DAG}.py"
PARALLELISM = 4
EVERY_MINUTE = "* * * * *"
FIRST_LOAD_VS_ENGINE_AND_INDEX = 1.2  # issue 18, target 3
NOOP_VS_EMPTY = 1.3
#: A workload ending this long after its task's last log line was noticed late (the supervisor
#: wakes every 5 s; a prompt exit is noticed within about 0.1 s).
LATE_EXIT_SECONDS = 2.0
_WORKLOAD_DONE = re.compile(r"^(\S+) .*Workload finished.*workload_id=([0-9a-f-]{36})")
_SHARE = re.compile(r"writing on (\d+) of \d+ connection")


def _seconds(run: dict[str, Any], start: str = "start_date") -> float:
    return (dt.datetime.fromisoformat(run["end_date"]) - dt.datetime.fromisoformat(run[start])).total_seconds()


def _timing(cluster: Any, run: dict[str, Any]) -> dict[str, Any]:
    """A finished run's duration and each task's (mapped tasks summed)."""
    tasks: dict[str, float] = {}
    spans: dict[str, tuple[str, str]] = {}
    for ti in cluster.task_instances(run):
        if ti.get("start_date") and ti.get("end_date"):
            tasks[ti["task_id"]] = tasks.get(ti["task_id"], 0.0) + _seconds(ti)
            first, last = spans.get(ti["task_id"], (ti["start_date"], ti["end_date"]))
            spans[ti["task_id"]] = (min(first, ti["start_date"]), max(last, ti["end_date"]))
    # What is not inside a task's span (critical path: the tasks run one after another, the mapped
    # ones side by side) is the scheduler's: queueing, handing over to the executor, heartbeats.
    in_tasks = sum(_seconds({"start_date": a, "end_date": b}) for a, b in spans.values())
    return {
        "seconds": _seconds(run),
        "spans": {k: round(_seconds({"start_date": a, "end_date": b}), 2) for k, (a, b) in spans.items()},
        "between_tasks_seconds": round(_seconds(run) - in_tasks, 2),
        "queued_to_end_seconds": _seconds(run, "queued_at") if run.get("queued_at") else None,
        "tasks": {k: round(v, 2) for k, v in tasks.items()},
        "run_id": run["dag_run_id"],
    }


def _scheduled_runs(cluster: Any, dag_id: str, count: int, timeout: float) -> list[dict[str, Any]]:
    """The first ``count`` scheduled runs of ``dag_id`` (logical-date order), once each has ended."""
    from dev.airflow_cluster import TERMINAL_STATES

    deadline = time.monotonic() + timeout
    while True:
        cluster.check_alive()
        runs = sorted(
            (r for r in cluster.runs(dag_id) if r["run_type"] == "scheduled"), key=lambda r: str(r["logical_date"])
        )[:count]
        if len(runs) == count and all(r["state"] in TERMINAL_STATES for r in runs):
            for run in runs:
                if run["state"] != "success":
                    raise RuntimeError(
                        f"run {run['dag_run_id']} of {dag_id} {run['state']}: {cluster.task_states(run)}"
                    )
            return runs
        if time.monotonic() > deadline:
            raise TimeoutError(f"{dag_id}: {len(runs)} of {count} scheduled runs ended within {timeout:g} s")
        time.sleep(2)


def _last_log_line(cluster: Any, ti: dict[str, Any]) -> dt.datetime | None:
    """When a task instance's own log last wrote."""
    last = next((line["timestamp"] for line in reversed(cluster.task_log(ti)) if line.get("timestamp")), None)
    return dt.datetime.fromisoformat(last.replace("Z", "+00:00")) if last else None


def writer_shares(cluster: Any, run: dict[str, Any]) -> dict[int, list[int]]:
    """The writers each mapped ``ingest`` task of ``run`` wrote on at once, every change of its
    share in order (its ``writing on N of M connection(s)`` lines, storage/writer_budget.py)."""
    shares: dict[int, list[int]] = {}
    for ti in cluster.task_instances(run):
        if ti["task_id"] == "ingest":
            events = (str(line.get("event", "")) for line in cluster.task_log(ti))
            shares[ti["map_index"]] = [int(m.group(1)) for e in events if (m := _SHARE.search(e))]
    return dict(sorted(shares.items()))


def workloads_done(cluster: Any) -> dict[str, dt.datetime]:
    """When each task instance's workload ended (``Workload finished`` in scheduler.log), by its id."""
    done: dict[str, dt.datetime] = {}
    for line in cluster.log_path("scheduler").read_text(errors="replace").splitlines():
        if match := _WORKLOAD_DONE.match(line):
            done[match.group(2)] = dt.datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))
    return done


def late_exits(cluster: Any, run: dict[str, Any], done: dict[str, dt.datetime]) -> list[float]:
    """Seconds from each task's last log line to the end of its workload (``done``, from
    :func:`workloads_done`), for the task instances of ``run`` that ran; a prompt exit is a
    fraction of a second."""
    gaps = []
    for ti in cluster.task_instances(run):
        last = _last_log_line(cluster, ti)
        if ti.get("id") in done and last is not None:
            gaps.append(round((done[ti["id"]] - last).total_seconds(), 2))
    return gaps


def scheduler(spec: Spec) -> dict[str, Any]:
    from dev.airflow_cluster import AirflowCluster
    from dev.embedded_postgres import recreate_database
    from dev.stack import airflow_env

    home, rows = Path(spec["home"]), int(spec["rows"])
    shutil.rmtree(home, ignore_errors=True)
    dags = home / "dags"
    dags.mkdir(parents=True)
    # The ingest DAG as shipped, next to the empty one: one dag-processor parses both.
    shutil.copy(Path(spec["dags_folder"]) / f"{INGEST_DAG}.py", dags)
    shutil.copy(EMPTY_DAG_FILE, dags)
    env = airflow_env(
        home,
        postgres_dsn=spec["dsn"],
        embedding_target=spec["target"],
        cache_target=spec["cache_target"],
        extra={
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": spec["metadata_dsn"],
            "RECRUIT_EMBEDDING_RETRIES": "0",  # a failure shows at once, not after back-off
            "RECRUIT_EMBEDDING_DB_CONNECTIONS": str(spec["connections"]),
            "RECRUIT_EMBEDDING_DB_WRITER_BUDGET": str(spec["writer_budget"]),
        },
    )
    cluster = AirflowCluster(env, log_dir=home / "logs", parallelism=PARALLELISM)
    timeout = float(spec.get("timeout", 3600))
    began = time.perf_counter()
    try:
        cluster.migrate()
        cluster.start()
        for dag_id in (INGEST_DAG, EMPTY_DAG):
            cluster.wait_for_dag(dag_id)
            cluster.set_paused(dag_id, False)
        ready = time.perf_counter() - began

        # The api-server builds its execution API's versioned routes on the first call a task
        # makes (the first task's "start", 2.6 s here at 141,897 rows, before the DAG file is even
        # read), once per api-server process: a deployment pays it once, not on every load. One
        # run of the empty DAG pays it here, before the first load is timed.
        warming = time.perf_counter()
        cluster.wait_for_run(EMPTY_DAG, run_id=cluster.trigger(EMPTY_DAG), timeout=timeout)
        warm_up = time.perf_counter() - warming

        loads = []
        for round_ in range(int(spec["load_rounds"])):  # bench.run --load-rounds
            if round_:
                recreate_database(spec["dsn"])  # empty again; the DAG's tasks apply the schema
            triggered = time.perf_counter()
            run_id = cluster.trigger(INGEST_DAG, spec["conf"])
            loads.append(
                (cluster.wait_for_run(INGEST_DAG, run_id=run_id, timeout=timeout), time.perf_counter() - triggered)
            )
            _check_stored(spec["dsn"], rows)

        # Both DAGs on a schedule (read when the files are parsed): one scheduled run each.
        cluster.restart(
            "dag-processor", {"RECRUIT_EMBEDDING_SCHEDULE": EVERY_MINUTE, "BENCH_EMPTY_DAG_SCHEDULE": EVERY_MINUTE}
        )
        count = int(spec["noop_rounds"])  # bench.run --noop-rounds
        wait = 90.0 * (count + 1)  # a run a minute, and the first one's minute to come
        noops = _scheduled_runs(cluster, INGEST_DAG, count, timeout=wait)
        empties = _scheduled_runs(cluster, EMPTY_DAG, count, timeout=wait)
        for dag_id in (INGEST_DAG, EMPTY_DAG):
            cluster.set_paused(dag_id, True)  # no further runs while the cluster stops
        _check_stored(spec["dsn"], rows)
        done = workloads_done(cluster)
        pairs = []
        for noop, empty in zip(noops, empties, strict=True):
            states = cluster.task_states(noop)
            if states.get("finalize") != "success":
                raise SystemExit(f"the scheduled no-op run {noop['dag_run_id']} did not finish: {states}")
            pairs.append(
                {
                    "noop": _timing(cluster, noop) | {"states": states, "late_exits": late_exits(cluster, noop, done)},
                    "empty": _timing(cluster, empty) | {"late_exits": late_exits(cluster, empty, done)},
                }
            )
        middle = _median_pair(pairs)
        firsts = [
            _timing(cluster, run)
            | {
                "trigger_to_seen_done_seconds": wall,
                "late_exits": late_exits(cluster, run, done),
                "writer_shares": writer_shares(cluster, run),
            }
            for run, wall in loads
        ]
        result = {
            "rows": rows,
            "seconds": lower_median(firsts, key=lambda timing: float(timing["seconds"]))["seconds"],
            "loads": firsts,
            "pairs": pairs,
            "noop": middle["noop"],
            "empty": middle["empty"],
            "cluster_ready_seconds": ready,
            "warm_up_seconds": warm_up,
            "parallelism": PARALLELISM,
            "connections": int(spec["connections"]),
            "writer_budget": int(spec["writer_budget"]),
            "conf": spec["conf"],
            "peak_rss_mib": None,
        }
    except BaseException:
        print(cluster.log_tails(), flush=True)
        raise
    finally:
        cluster.stop()
    return result


# -- figures (plain data in, text out; bench.report calls these) ------------------------------


def _pair_ratio(pair: dict[str, Any]) -> float:
    """One scheduled minute's figure: the no-op run's duration over the empty DAG's."""
    return float(pair["noop"]["seconds"]) / float(pair["empty"]["seconds"])


def _median_pair(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The (no-op, empty) pair whose ratio is the median (:func:`bench.measure.lower_median`)."""
    return lower_median(pairs, key=_pair_ratio)


def _pairs(s: dict[str, Any]) -> list[dict[str, Any]]:
    # A result from before the rounds holds one pair as ``noop`` and ``empty``.
    return list(s.get("pairs") or [{"noop": s["noop"], "empty": s["empty"]}])


def first_loads(s: dict[str, Any]) -> list[dict[str, Any]]:
    """The scheduler measurement's first loads, in round order; ``seconds`` is the median one's."""
    # A result from before the first load's rounds holds one load, as ``first``.
    return list(s.get("loads") or [s["first"]])


def _engine_and_index(result: dict[str, Any]) -> float | None:
    """Target 3's first-load yardstick: the bench run's default engine seconds plus its ivfflat build."""
    m = result["measurements"]
    engine, index = m.get(result["default_engine"]), m.get("ivfflat_build")
    return float(engine["seconds"]) + float(index["seconds"]) if engine and index else None


def _ratios(result: dict[str, Any]) -> tuple[float | None, float | None]:
    s, yardstick = result["measurements"].get("scheduler"), _engine_and_index(result)
    first = s["seconds"] / yardstick if s and yardstick else None
    noop = _pair_ratio(_median_pair(_pairs(s))) if s else None
    return first, noop


def _late(timing: dict[str, Any]) -> str:
    late = [g for g in timing.get("late_exits", []) if g > LATE_EXIT_SECONDS]
    return f"; {len(late)} late exit(s) ({', '.join(f'{g:.1f}' for g in late)} s)" if late else ""


def lines(result: dict[str, Any]) -> list[str]:
    s = result["measurements"].get("scheduler")
    if not s:
        return []
    first, noop = _ratios(result)
    yardstick = _engine_and_index(result)
    loads = first_loads(s)
    out = []
    for k, load in enumerate(loads, 1):
        # Wall spans where recorded (mapped tasks side by side), else summed task seconds.
        tasks = ", ".join(f"{t} {v:.1f} s" for t, v in load.get("spans", load["tasks"]).items())
        if "between_tasks_seconds" in load:
            tasks += f", between tasks {load['between_tasks_seconds']:.1f} s"
        if any(load.get("writer_shares", {}).values()):  # each ingest task's writers at once, every change in order
            shares = "; ".join(f"#{i} {'>'.join(map(str, v))}" for i, v in load["writer_shares"].items())
            tasks += f", writers at once {shares}"
        name = "scheduler first load / (engine + ivfflat build)" + (f", round {k}" if len(loads) > 1 else "")
        if yardstick:
            out.append(
                f"| {name} (run {load['seconds']:.2f} s; {tasks}{_late(load)}) | {load['seconds'] / yardstick:.2f}x |"
            )
    if len(loads) > 1 and first is not None:
        out.append(f"| scheduler first load / (engine + ivfflat build), median of {len(loads)} rounds | {first:.2f}x |")
    pairs = _pairs(s)
    for k, pair in enumerate(pairs, 1):
        no, empty = pair["noop"], pair["empty"]
        noop_tasks = ", ".join(f"{t} {v:.1f} s" for t, v in no["tasks"].items())
        empty_tasks = ", ".join(f"{t} {v:.1f} s" for t, v in empty["tasks"].items())
        out.append(
            f"| scheduled no-op run / empty DAG of the same shape, minute {k} (no-op {no['seconds']:.2f} s: "
            f"{noop_tasks}{_late(no)}; empty {empty['seconds']:.2f} s: {empty_tasks}{_late(empty)}) "
            f"| {_pair_ratio(pair):.2f}x |"
        )
    if len(pairs) > 1 and noop is not None:
        out.append(
            f"| scheduled no-op run / empty DAG of the same shape, median of {len(pairs)} minutes | {noop:.2f}x |"
        )
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    first, noop = _ratios(result)
    s = result["measurements"].get("scheduler")
    minutes = len(_pairs(s)) if s else 0
    rounds = len(first_loads(s)) if s else 0
    out = []
    for name, value, limit in (
        (
            "scheduler first load vs engine + ivfflat build" + (f", median of {rounds} rounds" if rounds > 1 else ""),
            first,
            FIRST_LOAD_VS_ENGINE_AND_INDEX,
        ),
        (
            "scheduled no-op run vs empty DAG of the same shape"
            + (f", median of {minutes} minutes" if minutes > 1 else ""),
            noop,
            NOOP_VS_EMPTY,
        ),
    ):
        out.append(
            {
                "target": name,
                "value": None if value is None else round(value, 3),
                "limit": f"<= {limit:g}",
                "status": "n/a" if value is None else "PASS" if value <= limit else "MISS",
                "shown": "-" if value is None else f"{value:.2f}x",
                "note": "LocalExecutor, parallelism 4, PostgreSQL metadata DB; run durations as Airflow records them",
            }
        )
    return out


def main(argv: list[str]) -> int:
    mode, spec_json, out = argv
    if mode != "scheduler":
        raise SystemExit(f"unknown mode {mode!r}; this module measures 'scheduler'")
    Path(out).write_text(json.dumps(scheduler(json.loads(spec_json))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
