"""``make bench`` end to end at a tiny size: it runs, stores every row, and writes a valid result."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dev.stack import REPO_ROOT


def _bench(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a bench module as ``make bench`` does; it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(180)
def test_bench_quick_run_writes_a_result_with_every_measurement() -> None:
    # Outside pytest's basetemp: PostgreSQL runs as another user when we are root.
    workdir = Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    try:
        proc = _bench("bench.run", "--rows", "2000", "--quick", "--hnsw", "--workdir", str(workdir))
        result = json.loads((workdir / "result-2000.json").read_text())
        measured = result["measurements"]
        assert {"ceiling", "naive", result["default_engine"], "incremental"} <= measured.keys()
        for key in ("ceiling", "naive", result["default_engine"], "incremental"):
            assert measured[key]["rows"] == 2000
            assert measured[key]["rows_per_second"] > 0
        engine = measured[result["default_engine"]]
        assert (engine["inserted"], engine["rows_dlq"]) == (2000, 0)
        assert engine["peak_rss_mib"] > 0
        assert measured["ivfflat_build"]["seconds"] > 0  # the incremental run had the ivfflat index
        assert measured["hnsw_build"]["seconds"] > 0  # then the switch to HNSW
        # Range sync: nothing changed streams nothing; 1% changed and 1% removed streams and deletes those.
        assert (measured["sync_unchanged"]["ranges_synced"], measured["sync_unchanged"]["rows_streamed"]) == (0, 0)
        assert measured["sync_full_refresh_unchanged"]["rows_streamed"] == 0
        assert measured["sync_every_row_unchanged"]["rows_streamed"] == 2000
        changed = measured["sync_1pct_changed_1pct_removed"]
        assert (changed["rows_streamed"], changed["updated"], changed["deleted"]) == (20, 20, 20), changed
        incremental = measured["incremental"]
        assert incremental["updated"] == incremental["expected_changed"] == 200
        assert incremental["unchanged"] == 1800
        # Two more (ceiling, naive, engine) rounds back to back; c/a and c/b are their medians.
        for key in ("ceiling_3", "naive_3", f"{result['default_engine']}_3"):
            assert measured[key]["rows"] == 2000
        c_a = next(t for t in result["targets"] if t["target"].startswith("engine rows/s vs COPY ceiling"))
        assert c_a["note"].startswith("median of 3 (ceiling, engine) pair(s)")
        # Load until queryable: the same COPY, then the ivfflat build, both timed and summed.
        top = measured["queryable_ceiling"]
        assert top["rows"] == 2000 and top["copy_seconds"] > 0 and top["index_seconds"] > 0
        assert top["seconds"] == pytest.approx(top["copy_seconds"] + top["index_seconds"])
        # The chart: a PNG beside the result.
        assert (workdir / "result-2000.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        statuses = {t["target"]: t["status"] for t in result["targets"]}
        assert set(statuses.values()) <= {"PASS", "MISS", "n/a"}
        assert "| (c) engine [default] |" in proc.stdout
        # The machine's speed around every measurement (bench/host_speed.py), printed beside it.
        for r in measured.values():
            assert r["probe_ms_before"] > 0 and r["probe_ms_after"] > 0, r
        ceiling = measured["ceiling"]
        assert f"| {ceiling['probe_ms_before']:.1f} / {ceiling['probe_ms_after']:.1f} |" in proc.stdout
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.timeout(180)
def test_the_ladder_runs_every_step_and_each_stores_every_row() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-ladder-"))
    try:
        proc = _bench("bench.ladder", "--rows", "2000", "--rounds", "1", "--workdir", str(workdir))
        steps = [line for line in proc.stdout.splitlines() if line.startswith("  round 1")]
        # One line a step; the ladder exits non-zero when a step handled or stored fewer rows.
        assert len(steps) == 5, proc.stdout
        assert all("rows/s" in line for line in steps)
        assert sum("PostgreSQL" in line for line in steps) == 3  # the steps that write
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_the_dag_runs_are_the_defaults_and_the_partition_count_they_do_not_plan() -> None:
    from bench.run import dag_variants

    # 141,897 rows are one partition by default, so the other run has four; 1M rows are four, so one.
    assert dag_variants(141_897) == [("dag_default", None), ("dag_partitions", 35_475)]
    assert dag_variants(1_000_000) == [("dag_default", None), ("dag_one_partition", 1_000_000)]
