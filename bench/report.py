"""Ratios, targets and the markdown table of a bench result (plain data in, text out)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import queryable, scheduler

ENGINE_VS_CEILING = 0.9  # issue 18: at 141,897 rows
ENGINE_VS_CEILING_AT_SCALE = 0.8  # and at 1,000,000
RSS_SCALE = 1.25
AI_SERVER_VS_MATRIX = 1.5
SCALE_ROWS = 1_000_000


def _rate(m: dict[str, Any] | None) -> float | None:
    return None if m is None else m.get("rows_per_second")


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


def _target(
    name: str, value: float | None, limit: float, *, at_least: bool, shown: str, note: str = ""
) -> dict[str, Any]:
    met = value is not None and (value >= limit if at_least else value <= limit)
    status = "n/a" if value is None else "PASS" if met else "MISS"
    return {
        "target": name,
        "value": None if value is None else round(value, 3),
        "limit": f"{'>=' if at_least else '<='} {limit:g}",
        "status": status,
        "shown": shown,
        "note": note,
    }


def baseline_pairs(result: dict[str, Any], baseline: str) -> list[float]:
    """Default engine rows/s over ``baseline``'s (``ceiling`` or ``naive``) in each pair: the first
    measurements, then the repeats measured back to back (``ceiling_2``, ``naive_2``, ...)."""
    m, default = result["measurements"], result["default_engine"]
    keys = [(baseline, default)] + [
        (key, f"{default}_{key.removeprefix(baseline + '_')}") for key in m if key.startswith(baseline + "_")
    ]
    ratios = [_ratio(_rate(m.get(engine)), _rate(m.get(base))) for base, engine in keys]
    return [r for r in ratios if r is not None]


def _median_note(pairs: list[float], baseline: str) -> str:
    shown = ", ".join(f"{r:.2f}" for r in pairs)
    return f"median of {len(pairs)} ({baseline}, engine) pair(s): {shown}" if len(pairs) > 1 else ""


def _default_peak_rss(result: dict[str, Any]) -> float | None:
    peak = result["measurements"].get(result["default_engine"], {}).get("peak_rss_mib")
    return None if peak is None else float(peak)


def targets(result: dict[str, Any], *, rss_runs: tuple[dict[str, Any], dict[str, Any]] | None) -> list[dict[str, Any]]:
    """PASS/MISS of the issue's targets; ``n/a`` when this run lacks a measurement they need.

    :param rss_runs: the results at 100k and at 1M rows (this run may be one of them).
    """
    pairs = baseline_pairs(result, "ceiling")
    c_a = statistics.median(pairs) if pairs else None
    # Issue 18 replaced issue 7's c/b (5x naive) and d/c (DAG within 1.3x of the engine) targets:
    # the first asked for more than the COPY ceiling, the second left out the index build the DAG
    # must do. Both ratios stay in the table; the DAG is read against the load-until-queryable
    # ceiling (bench/queryable.py) and the real scheduler (bench/scheduler.py).
    engine_limit = ENGINE_VS_CEILING if result["rows"] < SCALE_ROWS else ENGINE_VS_CEILING_AT_SCALE
    out = [
        _target(
            "engine rows/s vs COPY ceiling (c/a)",
            c_a,
            engine_limit,
            at_least=True,
            shown=_fmt(c_a),
            note=_median_note(pairs, "ceiling"),
        ),
    ]
    # Worker RSS at 1M against 100k: two runs; this one and a stored one, or two stored ones.
    rss_ratio: float | None = None
    note = "needs results of --rows 100000 and --rows 1000000"
    if rss_runs is not None:
        small, large = (_default_peak_rss(r) for r in rss_runs)
        if small and large:
            rss_ratio = large / small
            note = f"{large:.0f} MiB at 1M / {small:.0f} MiB at 100k, from {rss_runs[0]['started_utc']} and {rss_runs[1]['started_utc']} runs"
    out.append(
        _target(
            "worker peak RSS at 1M / at 100k",
            rss_ratio,
            RSS_SCALE,
            at_least=False,
            shown=_fmt(rss_ratio, ".2f", "x"),
            note=note,
        )
    )
    out += queryable.targets(result) + scheduler.targets(result)
    ai = result["ai_server"]
    loaded, fixed = ai.get("rss_after_load_mib"), ai.get("fixed_rss_mib")
    data_rss = loaded - fixed if loaded is not None and fixed is not None else None
    ai_ratio = _ratio(data_rss, ai.get("matrix_mib"))
    out.append(
        _target(
            "AI server data RSS / float32 matrix",
            ai_ratio,
            AI_SERVER_VS_MATRIX,
            at_least=False,
            shown=_fmt(ai_ratio, ".2f", "x"),
            note=f"RSS after load minus that of a 1000-row server ({_fmt(fixed, '.0f')} MiB)",
        )
    )
    return out


_LABELS = {
    "ceiling": ("(a) ceiling", "COPY BINARY, pre-encoded, 1 conn"),
    "naive": ("(b) naive", "RowChunk + list(vector), executemany upserts of 300, 1 conn"),
    "dag_default": ("(d) DAG", "recruit_embedding_ingest, the DAG's defaults"),
    "dag_partitions": ("(d) DAG", "recruit_embedding_ingest, four partitions"),
    "dag_one_partition": ("(d) DAG", "recruit_embedding_ingest, one partition"),
    "incremental": ("incremental", "10% changed, ivfflat present"),
    "queryable_ceiling": ("(a') load until queryable", "COPY BINARY, pre-encoded, 1 conn, then the ivfflat build"),
    "scheduler": ("(e) scheduler", "recruit_embedding_ingest triggered, LocalExecutor x4, PostgreSQL metadata DB"),
    "ivfflat_build": ("ivfflat build", "ensure_ann_index after the default engine load (as finalize does)"),
    "hnsw_build": (
        "HNSW build",
        "ensure_ann_index(method='hnsw') on the same table afterwards (m 16, ef_construction 64)",
    ),
}


def _cpu(r: dict[str, Any]) -> str:
    """CPU microseconds a row of each process: where a 2-core machine spends its time."""
    parts = [r.get(f"{name}_cpu_seconds") for name in ("worker", "ai", "pg")]
    return " / ".join("-" if p is None else f"{p / r['rows'] * 1e6:.0f}" for p in parts)


def _probes(r: dict[str, Any]) -> str:
    """The machine's speed before and after a measurement (bench/host_speed.py; lower is faster);
    results of runs before the probe have none."""
    before, after = r.get("probe_ms_before"), r.get("probe_ms_after")
    return "-" if before is None or after is None else f"{before:.1f} / {after:.1f}"


def render(result: dict[str, Any]) -> str:
    m = result["measurements"]
    a, b = _rate(m.get("ceiling")), _rate(m.get("naive"))
    default = result["default_engine"]
    lines = [
        f"rows: {result['rows']:,}, dimension {result['dimension']}; {result['machine']['cpus']} CPUs "
        f"({result['machine']['cpu_model']}), load at start {result['machine']['load_at_start']}, "
        f"at end {result['machine']['load_at_end']}",
        "",
        "| measurement | settings | rows | seconds | rows/s | x ceiling | x naive | worker peak RSS MiB "
        "| CPU us/row worker / AI server / PostgreSQL | load | probe ms before / after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in m.items():
        if "rows_per_second" not in r:
            continue
        name, settings = _LABELS.get(key, ("(c) engine", r.get("setting", "")))
        base, _, k = key.rpartition("_")
        if k.isdigit() and base in ("queryable_ceiling", queryable.DAG_RUNS[0]):  # target 1's later rounds
            name, settings = _LABELS[base][0], _LABELS[base][1] + f", round {k}"
        if key.startswith("sync_"):  # the range-sync runs: named by what each one does
            name, settings = "range sync", key.removeprefix("sync_").replace("_", " ")
        for baseline in ("ceiling", "naive"):
            if key.startswith(baseline + "_"):
                name, settings = _LABELS[baseline][0], _LABELS[baseline][1] + f", pair {key.split('_')[1]}"
        if key == "scheduler" and "connections" in r:
            budget = r.get("writer_budget")  # results before the budget have none: every task wrote on all
            settings += f", {r['connections']} conn a task" + (
                f", a budget of {budget} writers" if budget else ", no writer budget"
            )
            settings += f", median of {len(scheduler.first_loads(r))} first loads"
        if key == default:
            name += " [default]"
        if key.startswith("dag"):
            f = r["finalize"]
            settings += f" ({f['partitions']}); tasks {f['task_rows_per_second']:.0f} rows/s, slowest {f['slowest_partition_seconds']:.1f} s"
        if key == "incremental":
            settings += (
                f"; {r['updated']} updated / {r['unchanged']} unchanged (expected {r['expected_changed']} changed)"
            )
        rate = r["rows_per_second"]
        # The index build is not an ingest: rows/s against the ingests would mean nothing.
        vs_a, vs_b = (None, None) if key.endswith(("_build", "_ivfflat")) else (_ratio(rate, a), _ratio(rate, b))
        lines.append(
            f"| {name} | {settings} | {r['rows']:,} | {r['seconds']:.2f} | {rate:,.0f} | "
            f"{_fmt(vs_a)} | {_fmt(vs_b, '.1f', 'x')} | {_fmt(r.get('peak_rss_mib'), '.0f')} | "
            f"{_cpu(r)} | {r['load_before']:.1f} | {_probes(r)} |"
        )
    engine = m.get(default)
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines.append(f"| c/a engine / ceiling (rows/s) | {_fmt(_ratio(_rate(engine), a))} |")
    pairs = baseline_pairs(result, "ceiling")
    if len(pairs) > 1:
        shown = ", ".join(f"{r:.2f}" for r in pairs)
        lines.append(f"| c/a median of {len(pairs)} back-to-back pairs ({shown}) | {statistics.median(pairs):.2f} |")
    lines.append(f"| c/b engine / naive (rows/s) | {_fmt(_ratio(_rate(engine), b), '.1f', 'x')} |")
    pairs = baseline_pairs(result, "naive")
    if len(pairs) > 1:
        shown = ", ".join(f"{r:.1f}x" for r in pairs)
        lines.append(f"| c/b median of {len(pairs)} back-to-back pairs ({shown}) | {statistics.median(pairs):.1f}x |")
    index = m.get("ivfflat_build")
    for key in queryable.DAG_RUNS:
        if key in m and engine:
            what = _LABELS[key][1].split(", ")[1]
            lines.append(f"| d/c DAG wall / engine seconds ({what}) | {m[key]['seconds'] / engine['seconds']:.2f}x |")
            if "run" in m[key]:
                run = m[key]["run"]
                tasks = ", ".join(f"{t} {s:.1f} s" for t, s in run["tasks"].items())
                lines.append(
                    f"| d/c DAG run duration / engine seconds ({what}; {tasks}) | "
                    f"{run['seconds'] / engine['seconds']:.2f}x |"
                )
            if index:
                lines.append(
                    f"| d/(c + ivfflat build) ({what}; informational, the DAG builds the index too) | "
                    f"{m[key]['seconds'] / (engine['seconds'] + index['seconds']):.2f}x |"
                )
    lines += queryable.lines(result) + scheduler.lines(result)
    ai = result["ai_server"]
    lines += [
        "",
        f"AI server RSS: {_fmt(ai.get('rss_after_load_mib'), '.0f')} MiB after load, "
        f"{_fmt(ai.get('rss_after_streams_mib'), '.0f')} MiB after the streams, peak {_fmt(ai.get('peak_rss_mib'), '.0f')} MiB "
        f"(float32 matrix {ai['matrix_mib']:.0f} MiB; a 1000-row server: {_fmt(ai.get('fixed_rss_mib'), '.0f')} MiB)",
        "",
        "CPU us/row: worker = the ingesting process during the timed part (the DAG: every Airflow "
        "process, start-up included); AI server and PostgreSQL = all their processes over the whole "
        "measurement (set-up and the row-count check included).",
        "",
        "| target | value | limit | result |",
        "|---|---:|---:|---|",
    ]
    for t in result["targets"]:
        note = f" ({t['note']})" if t["note"] else ""
        lines.append(f"| {t['target']}{note} | {t['shown']} | {t['limit']} | {t['status']} |")
    return "\n".join(lines) + "\n"


def rss_runs(result: dict[str, Any], workdir: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The 100k and 1M results for the RSS target: this run where it is one, else stored ones."""
    runs: list[dict[str, Any]] = []
    for rows in (100_000, SCALE_ROWS):
        path = workdir / f"result-{rows}.json"
        if result["rows"] == rows:
            runs.append(result)
        elif path.exists():
            runs.append(json.loads(path.read_text()))
        else:
            return None
    return runs[0], runs[1]


def main(argv: list[str]) -> int:
    """``python -m bench.report RESULT.json``: the table again, targets recomputed from the stored figures."""
    path = Path(argv[0])
    result = json.loads(path.read_text())
    result["targets"] = targets(result, rss_runs=rss_runs(result, path.parent))
    print(render(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
