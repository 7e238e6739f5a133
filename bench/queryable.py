"""Load until queryable: PostgreSQL's own ceiling for a first load that ends with the ANN index,
and the DAG's marginal cost against it.

A first load is done when the rows are searchable, so its ceiling is COPY BINARY of pre-encoded
rows into both tables followed by the same ivfflat build the DAG's ``finalize`` does
(``ensure_ann_index``), on the same PostgreSQL. The DAG's marginal cost is a first load minus a
run of the same DAG that finds nothing new (its fixed cost: start-up, planning, the cache call),
both measured in the same bench run.

One such figure moves by a third between back-to-back runs on a 2-core machine (bench/RESULTS.md),
so the bench measures it in rounds: round 1 is the ceiling measured first and the DAG's defaults;
each further round ``k`` measures ``queryable_ceiling_k``, ``dag_default_k`` and ``dag_noop_k`` back
to back. Target 1 is the median of the rounds' ratios, as target 2 takes the median of its pairs.

Measurement modes (``python -m bench.queryable MODE SPEC_JSON OUT_JSON``, run by ``bench.run``):

- ``queryable_ceiling``: the COPY ceiling of ``bench.measure.ceiling``, then the ivfflat build;
- ``dag_noop``: ``airflow dags test`` again on a database a first load has filled.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import psycopg

from bench.measure import Spec, ceiling, dag, lower_median
from bench.measure import main as run_mode

QUERYABLE_VS_DAG = 1.1  # issue 18, target 1: marginal DAG cost at most 1.1x the ceiling


def queryable_ceiling(spec: Spec) -> dict[str, Any]:
    """COPY BINARY into the empty tables, then ``ensure_ann_index`` (ivfflat), each timed."""
    from airflow_embedding_provider.storage.schema import ensure_ann_index

    copied = ceiling(spec)
    with psycopg.connect(spec["dsn"], autocommit=True) as conn:
        began = time.perf_counter()
        built = ensure_ann_index(conn, method="ivfflat")
        index_seconds = time.perf_counter() - began
    if not built:
        raise SystemExit("ensure_ann_index built nothing after the COPY")
    return {
        "rows": copied["rows"],
        "seconds": copied["seconds"] + index_seconds,
        "copy_seconds": copied["seconds"],
        "index_seconds": index_seconds,
        "worker_cpu_seconds": copied["worker_cpu_seconds"],
        "peak_rss_mib": None,
    }


def dag_noop(spec: Spec) -> dict[str, Any]:
    """The DAG once more on a loaded database: the AI server has nothing after the checkpoint.

    A scheduled run comes minutes after the load, when autovacuum has vacuumed the new rows; done
    here first (not timed), autovacuum does not do it during this run, which would lengthen the
    fixed cost and so shorten the marginal."""
    with psycopg.connect(spec["dsn"], autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    result = dag(spec)
    if int(result["finalize"]["rows_received"]) != 0:
        raise SystemExit(f"the no-op run received {result['finalize']['rows_received']} rows, expected 0")
    # ``rows`` is the table's size (checked by ``dag``); this run moved none of them.
    result["rows_received"] = 0
    return result


MODES: dict[str, Callable[[Spec], dict[str, Any]]] = {
    "queryable_ceiling": queryable_ceiling,
    "dag_noop": dag_noop,
}


# -- figures (plain data in, text out; bench.report calls these) ------------------------------


#: The DAG runs a bench may hold (bench.run.dag_variants), the DAG's defaults first: target 1's figure.
DAG_RUNS = ("dag_default", "dag_partitions", "dag_one_partition")


def _suffix(round_: int) -> str:
    return "" if round_ == 1 else f"_{round_}"


def round_keys(round_: int) -> tuple[str, str, str]:
    """The measurement keys of one round of target 1: its ceiling, its first load, its no-op run."""
    end = _suffix(round_)
    return f"queryable_ceiling{end}", f"{DAG_RUNS[0]}{end}", f"dag_noop{end}"


def marginal(result: dict[str, Any], first: str = DAG_RUNS[0], round_: int = 1) -> dict[str, float] | None:
    """The DAG's first load minus its no-op run, against the load-until-queryable ceiling.

    ``first``: which DAG run of round 1 (``DAG_RUNS``); later rounds hold the DAG's defaults only."""
    m = result["measurements"]
    top_key, load_key, noop_key = round_keys(round_)
    if round_ == 1:
        load_key = first
    load, noop, top = m.get(load_key), m.get(noop_key), m.get(top_key)
    if not (load and noop and top):
        return None
    seconds = load["seconds"] - noop["seconds"]
    out = {
        "round": round_,
        "first_seconds": load["seconds"],
        "noop_seconds": noop["seconds"],
        "marginal_seconds": seconds,
        "ceiling_seconds": top["seconds"],
        "ratio": seconds / top["seconds"],
    }
    if load.get("run") and noop.get("run"):
        # The same on Airflow's own run durations, without the CLI's start-up.
        out["run_marginal_seconds"] = load["run"]["seconds"] - noop["run"]["seconds"]
        out["run_ratio"] = out["run_marginal_seconds"] / top["seconds"]
    return out


def rounds(result: dict[str, Any]) -> list[dict[str, float]]:
    """Target 1's figure of every round measured (the DAG's defaults), round 1 first."""
    out: list[dict[str, float]] = []
    while (figures := marginal(result, round_=len(out) + 1)) is not None:
        out.append(figures)
    return out


def median_round(result: dict[str, Any]) -> dict[str, float] | None:
    """The round whose ratio is the median (the lower middle one of an even count), else ``None``.

    A round whose no-op run took longer than its first load measured only the fixed cost's noise
    and counts as no figure."""
    valid = [r for r in rounds(result) if r["marginal_seconds"] > 0]
    return lower_median(valid, key=lambda r: r["ratio"]) if valid else None


def lines(result: dict[str, Any]) -> list[str]:
    """Markdown rows for the ratio table."""
    m = result["measurements"]
    out: list[str] = []
    top = m.get("queryable_ceiling")
    if top:
        out.append(
            f"| load-until-queryable ceiling: COPY {top['copy_seconds']:.2f} s + ivfflat {top['index_seconds']:.2f} s "
            f"| {top['seconds']:.2f} s |"
        )
    engine, index = m.get(result["default_engine"]), m.get("ivfflat_build")
    if top and engine and index:
        out.append(
            f"| (engine + ivfflat build) / load-until-queryable ceiling ({engine['seconds']:.2f} + "
            f"{index['seconds']:.2f} s) | {(engine['seconds'] + index['seconds']) / top['seconds']:.2f}x |"
        )
    measured = rounds(result)
    for key in DAG_RUNS:
        figures = marginal(result, key)
        if figures is None:
            continue
        out.append(
            f"| DAG marginal / load-until-queryable ceiling ({key}: first load {figures['first_seconds']:.2f} s "
            f"- no-op run {figures['noop_seconds']:.2f} s = {figures['marginal_seconds']:.2f} s) | {figures['ratio']:.2f}x |"
        )
        if "run_ratio" in figures:
            out.append(
                f"| DAG marginal on run durations / ceiling ({key}: {figures['run_marginal_seconds']:.2f} s) "
                f"| {figures['run_ratio']:.2f}x |"
            )
    for figures in measured[1:]:
        k = int(figures["round"])
        out.append(
            f"| DAG marginal / load-until-queryable ceiling, round {k} ({DAG_RUNS[0]}: first load "
            f"{figures['first_seconds']:.2f} s - no-op run {figures['noop_seconds']:.2f} s = "
            f"{figures['marginal_seconds']:.2f} s over {figures['ceiling_seconds']:.2f} s) | {figures['ratio']:.2f}x |"
        )
    middle = median_round(result)
    if len(measured) > 1 and middle is not None:
        shown = ", ".join(f"{r['ratio']:.2f}" for r in measured)
        out.append(
            f"| DAG marginal / load-until-queryable ceiling, median of {len(measured)} rounds ({shown}) "
            f"| {middle['ratio']:.2f}x |"
        )
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's target 1, as ``bench.report`` lists targets: the median round's ratio."""
    measured = rounds(result)
    figures = median_round(result)
    value = None if figures is None else figures["ratio"]
    note = ""
    if measured:
        planned = result["measurements"][DAG_RUNS[0]].get("finalize", {}).get("partitions")
        shown = ", ".join(
            f"{r['ratio']:.2f}" if r["marginal_seconds"] > 0 else "no figure (the no-op run took longer)"
            for r in measured
        )
        where = f"`airflow dags test`, the DAG's defaults ({planned} partition{'' if planned == 1 else 's'})"
        if figures is None:
            # Every no-op run took longer than its first load: the fixed cost's noise exceeded the
            # load itself, so the differences measure nothing.
            note = f"{where}; no figure: the no-op run took longer than the first load in every round"
        elif len(measured) == 1:
            note = f"{figures['marginal_seconds']:.2f} s over {figures['ceiling_seconds']:.2f} s; {where}"
        else:
            note = (
                f"median of {len(measured)} rounds ({shown}); round {int(figures['round'])}: "
                f"{figures['marginal_seconds']:.2f} s over {figures['ceiling_seconds']:.2f} s; {where}"
            )
    met = value is not None and value <= QUERYABLE_VS_DAG
    return [
        {
            "target": "DAG marginal (first load - no-op run) vs load-until-queryable ceiling",
            "value": None if value is None else round(value, 3),
            "limit": f"<= {QUERYABLE_VS_DAG:g}",
            "status": "n/a" if value is None else "PASS" if met else "MISS",
            "shown": "-" if value is None else f"{value:.2f}x",
            "note": note,
        }
    ]


if __name__ == "__main__":
    sys.exit(run_mode(sys.argv[1:], MODES))
