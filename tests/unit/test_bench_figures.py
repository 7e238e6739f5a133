"""The bench's figures for targets 1 and 3: medians over rounds, and late task exits read from logs.

The bench measures these for real (``make bench``); here only the arithmetic and the log reading,
on results and log lines in the layout the bench and Airflow write them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import queryable, scheduler
from dev.airflow_cluster import AirflowCluster


def _result(rounds: list[tuple[float, float, float]]) -> dict[str, Any]:
    """A bench result holding target 1's rounds, each (ceiling s, first load s, no-op run s)."""
    measurements: dict[str, Any] = {}
    for k, (top, load, noop) in enumerate(rounds, 1):
        ceiling_key, load_key, noop_key = queryable.round_keys(k)
        measurements[ceiling_key] = {"seconds": top, "copy_seconds": top / 2, "index_seconds": top / 2}
        measurements[load_key] = {"seconds": load, "finalize": {"partitions": 1}}
        measurements[noop_key] = {"seconds": noop}
    return {"measurements": measurements, "default_engine": "engine"}


def test_target_1_is_the_median_round_and_names_every_round() -> None:
    # Ratios 1.5, 1.0 and 1.2: the median is round 3's 1.2, not round 1's 1.5.
    result = _result([(10.0, 25.0, 10.0), (10.0, 20.0, 10.0), (10.0, 22.0, 10.0)])
    (target,) = queryable.targets(result)
    assert target["value"] == 1.2
    assert target["status"] == "MISS"
    assert target["note"].startswith("median of 3 rounds (1.50, 1.00, 1.20); round 3: 12.00 s over 10.00 s")
    assert queryable.median_round(result)["round"] == 3  # type: ignore[index]
    assert any("median of 3 rounds" in line and "1.20x" in line for line in queryable.lines(result))


def test_a_round_whose_no_op_run_took_longer_is_no_figure() -> None:
    # Round 2's no-op run outlasted its first load: the median is taken over rounds 1 and 3 (lower middle).
    result = _result([(10.0, 21.0, 10.0), (10.0, 9.0, 10.0), (10.0, 20.5, 10.0)])
    (target,) = queryable.targets(result)
    assert target["value"] == 1.05 and target["status"] == "PASS"
    assert "no figure (the no-op run took longer)" in target["note"]
    only_noise = _result([(10.0, 9.0, 10.0)])
    assert queryable.targets(only_noise)[0]["status"] == "n/a"


def test_one_round_reads_as_before() -> None:
    (target,) = queryable.targets(_result([(8.0, 18.0, 9.2)]))
    assert target["value"] == 1.1 and target["status"] == "PASS"
    assert target["note"].startswith("8.80 s over 8.00 s;")


def _timing(seconds: float) -> dict[str, Any]:
    return {"seconds": seconds, "tasks": {"plan_partitions": 0.2}, "late_exits": [0.1, 5.2]}


def test_target_3_no_op_is_the_median_minute() -> None:
    pairs = [
        {"noop": _timing(11.0), "empty": _timing(4.9)},  # 2.24x: one late exit in the no-op run
        {"noop": _timing(5.0), "empty": _timing(4.6)},  # 1.09x
        {"noop": _timing(4.8), "empty": _timing(9.0)},  # 0.53x: the late exit in the empty run
    ]
    result = {
        "measurements": {"scheduler": {"seconds": 10.0, "first": {"tasks": {}}, "pairs": pairs}},
        "default_engine": "engine",
    }
    _, noop = scheduler.targets(result)
    assert noop["value"] == round(5.0 / 4.6, 3) and noop["status"] == "PASS"
    assert noop["target"].endswith("median of 3 minutes")
    lines = scheduler.lines(result)
    assert sum("minute" in line for line in lines) == 4  # each minute, then the median
    assert "1 late exit(s) (5.2 s)" in lines[0]


def test_target_3_first_load_is_the_median_round() -> None:
    # Over an engine + build of 50 s: 1.30x (the plan's exit noticed 5 s late), 1.20x, 1.24x.
    loads = [_timing(65.0), _timing(60.0), _timing(62.0)]
    pairs = [{"noop": _timing(5.0), "empty": _timing(5.0)}]
    measured: dict[str, Any] = {"seconds": 62.0, "loads": loads, "pairs": pairs}
    result = {
        "measurements": {"scheduler": measured, "engine": {"seconds": 15.0}, "ivfflat_build": {"seconds": 35.0}},
        "default_engine": "engine",
    }
    first, _ = scheduler.targets(result)
    assert first["value"] == 1.24 and first["status"] == "MISS"
    assert first["target"].endswith("median of 3 rounds")
    lines = scheduler.lines(result)
    assert [line.rsplit("|", 2)[1].strip() for line in lines[:4]] == ["1.30x", "1.20x", "1.24x", "1.24x"]
    assert "round 1 (run 65.00 s" in lines[0] and "1 late exit(s) (5.2 s)" in lines[0]
    # A result from before the rounds: one load, as ``first``, read as before.
    measured["first"] = measured.pop("loads")[2]
    assert scheduler.targets(result)[0]["target"] == "scheduler first load vs engine + ivfflat build"


class _Cluster:
    """What ``late_exits`` reads of an ``AirflowCluster``: its log folder, a run's task instances and
    their logs (read by the cluster's own ``task_log``)."""

    task_log = AirflowCluster.task_log

    def __init__(self, log_dir: Path, task_instances: list[dict[str, Any]]) -> None:
        self.log_dir = log_dir
        self.env = {"AIRFLOW_HOME": str(log_dir.parent), "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(log_dir)}
        self._tis = task_instances

    def log_path(self, component: str) -> Path:
        return self.log_dir / f"{component}.log"

    def task_instances(self, run: dict[str, Any]) -> list[dict[str, Any]]:
        return self._tis


def _task_log(log_dir: Path, ti: dict[str, Any], stamps: list[str], events: list[str] | None = None) -> None:
    folder = log_dir / f"dag_id={ti['dag_id']}" / f"run_id={ti['dag_run_id']}" / f"task_id={ti['task_id']}"
    if ti["map_index"] >= 0:
        folder /= f"map_index={ti['map_index']}"
    folder.mkdir(parents=True)
    texts = events or ["::endgroup::"] * len(stamps)
    lines = [json.dumps({"timestamp": s, "event": e}) for s, e in zip(stamps, texts, strict=True)]
    (folder / f"attempt={ti['try_number']}.log").write_text("\n".join(lines) + "\n")


def test_writer_shares_are_read_in_order_from_each_ingest_tasks_log(tmp_path: Path) -> None:
    run = "manual__2026-12-03T08:55:00+00:00"
    base = {"dag_id": "recruit_embedding_ingest", "dag_run_id": run, "try_number": 1}
    tis = [
        base | {"task_id": "ingest", "map_index": 0},
        base | {"task_id": "ingest", "map_index": 1},
        base | {"task_id": "finalize", "map_index": -1},
    ]
    line = "writing on {} of 4 connection(s) at once: a budget of 4 writer(s) over {} ingest task(s) on this database"
    stamps = ["2026-12-03T08:55:01.000000Z", "2026-12-03T08:55:02.000000Z", "2026-12-03T08:55:03.000000Z"]
    _task_log(tmp_path, tis[0], stamps, [line.format(4, 1), "1000 chunks", line.format(1, 4)])
    _task_log(tmp_path, tis[1], stamps[:1], [line.format(1, 4)])
    _task_log(tmp_path, tis[2], stamps[:1], [line.format(9, 9)])  # not an ingest task: not read
    assert scheduler.writer_shares(_Cluster(tmp_path, tis), {"dag_run_id": run}) == {0: [4, 1], 1: [1]}


def test_late_exits_are_the_gap_from_a_task_last_log_line_to_its_workload_end(tmp_path: Path) -> None:
    run = "scheduled__2026-12-02T04:03:00+00:00"
    prompt = {"id": "01a234ec-5c35-7995-88d5-ba0cfd5494b9", "task_id": "finalize", "map_index": -1}
    late = {"id": "01a234ec-5c25-78d5-a382-0342ba8a39bf", "task_id": "ingest", "map_index": 2}
    never_ran = {"id": "01a234ec-5c22-732a-9c92-79bd2dacd55d", "task_id": "announce_change", "map_index": -1}
    tis = [
        ti | {"dag_id": "recruit_embedding_ingest", "dag_run_id": run, "try_number": 1}
        for ti in (prompt, late, never_ran)
    ]
    _task_log(tmp_path, tis[0], ["2026-12-02T04:03:57.491420Z", "2026-12-02T04:03:57.835389Z"])
    _task_log(tmp_path, tis[1], ["2026-12-02T04:04:00.429058Z", "2026-12-02T04:04:00.702766Z"])
    (tmp_path / "scheduler.log").write_text(
        "2026-12-02T04:03:57.850812Z [info     ] Workload finished              [supervisor] "
        "duration=0.40344402099998433 exit_code=0 final_state=success loc=supervisor.py:2658 "
        f"workload_id={prompt['id']} workload_type=ExecuteTask\n"
        "2026-12-02T04:04:05.737517Z [info     ] Workload finished              [supervisor] "
        "duration=5.504729015999999 exit_code=0 final_state=skipped loc=supervisor.py:2658 "
        f"workload_id={late['id']} workload_type=ExecuteTask\n"
    )
    cluster = _Cluster(tmp_path, tis)
    gaps = scheduler.late_exits(cluster, {"dag_run_id": run}, scheduler.workloads_done(cluster))
    assert gaps == [0.02, 5.03]
    assert [g > scheduler.LATE_EXIT_SECONDS for g in gaps] == [False, True]


def test_rounds_and_scheduler_connections_below_one_are_refused_in_one_line(capsys: Any) -> None:
    from bench.run import _parse

    assert _parse(["--quick"]).load_rounds == 1 and _parse([]).load_rounds == 3
    for flag in ("--dag-rounds", "--load-rounds", "--noop-rounds", "--scheduler-connections"):
        with pytest.raises(SystemExit) as exc:
            _parse([flag, "0"])
        assert exc.value.code == 2
        assert f"{flag} must be 1 or more" in capsys.readouterr().err.splitlines()[-1]


def test_the_scheduler_budget_defaults_to_one_tasks_writers_and_refuses_a_negative_one(capsys: Any) -> None:
    from bench.run import _parse

    assert _parse([]).scheduler_budget == 4
    assert _parse(["--scheduler-connections", "2"]).scheduler_budget == 2
    assert _parse(["--scheduler-budget", "0"]).scheduler_budget == 0
    with pytest.raises(SystemExit) as exc:
        _parse(["--scheduler-budget", "-1"])
    assert exc.value.code == 2
    assert "--scheduler-budget must be 0 (none) or more" in capsys.readouterr().err.splitlines()[-1]
