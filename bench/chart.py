"""The bench's picture: rows/s of every measurement against the two ceilings, as a PNG.

One horizontal bar a measurement, in the order measured; two vertical lines mark the COPY ceiling
(rows into both tables) and the load-until-queryable ceiling (COPY plus the ivfflat build), both
from the same run. Index builds, range syncs and runs that move no rows are left out.

    python -m bench.chart RESULT.json [OUT.png]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: the bench runs headless

import matplotlib.pyplot as plt

from bench.queryable import median_round

_COLOURS = {"ceiling": "#4c72b0", "queryable": "#4c72b0", "naive": "#c44e52", "dag": "#8172b2", "scheduler": "#937860"}


def _colour(key: str) -> str:
    return next((c for prefix, c in _COLOURS.items() if key.startswith(prefix)), "#55a868")  # engine: green


def bars(result: dict[str, Any]) -> list[tuple[str, float, str]]:
    """(label, rows/s, colour) for each measurement that moved rows."""
    out = []
    for key, r in result["measurements"].items():
        rate = r.get("rows_per_second")
        # Range syncs move only the rows that differ (none, when nothing changed), so their rows/s
        # over the whole table would stretch the axis past every load: their own table has them.
        if not rate or key.endswith("_build") or r.get("mode") in ("index", "sync"):
            continue
        label = key if "setting" not in r else f"{key} ({r['setting']})"
        out.append((label, float(rate), _colour(key)))
    # Derived in the same run: what a first load costs beyond the DAG's fixed cost, and the
    # engine followed by the index build, both against the load-until-queryable ceiling.
    rows = result["rows"]
    engine, index = result["measurements"].get(result["default_engine"]), result["measurements"].get("ivfflat_build")
    if engine and index:
        out.append(("engine + ivfflat build", rows / (engine["seconds"] + index["seconds"]), "#55a868"))
    figures = median_round(result)  # target 1's figure: the median round's
    if figures:
        out.append(("DAG marginal: first load - no-op run", rows / figures["marginal_seconds"], _COLOURS["dag"]))
    return out


def _rounds(m: dict[str, Any], name: str) -> list[float]:
    """rows/s of measurement ``name`` and its repeats (``name_2``, ``name_3``, ...)."""
    return [r["rows_per_second"] for k, r in m.items() if k == name or k.removeprefix(name + "_").isdigit()]


def write_chart(result: dict[str, Any], path: Path) -> Path:
    """Write the PNG to ``path``; returns it."""
    items = bars(result)
    m = result["measurements"]
    fig, ax = plt.subplots(figsize=(11, 0.42 * len(items) + 2.2), dpi=100)
    labels = [label for label, _, _ in items]
    ax.barh(range(len(items)), [rate for _, rate, _ in items], color=[c for _, _, c in items])
    ax.set_yticks(range(len(items)), labels, fontsize=8)
    ax.invert_yaxis()  # first measured on top
    # The COPY ceiling's rounds (ceiling, ceiling_2, ...) can differ by 3x on a loaded machine: the
    # line is their median, as c/a takes the median round.
    rounds = _rounds(m, "ceiling")
    queryable = _rounds(m, "queryable_ceiling")
    for rate, style, name in (
        (statistics.median(rounds) if rounds else None, "-", f"COPY ceiling (median of {len(rounds)} rounds)"),
        (
            statistics.median(queryable) if queryable else None,
            "--",
            f"load-until-queryable ceiling (COPY + ivfflat; median of {len(queryable)} rounds)",
        ),
    ):
        if rate:
            ax.axvline(rate, color="black", linestyle=style, linewidth=1.2, label=f"{name}: {rate:,.0f} rows/s")
    for i, (_, rate, _) in enumerate(items):
        ax.text(rate, i, f" {rate:,.0f}", va="center", fontsize=7)
    machine = result["machine"]
    ax.set_xlabel("rows/s (higher is better)")
    ax.set_title(
        f"{result['rows']:,} rows, {result['dimension']}-d; commit {machine.get('commit', '?')}, "
        f"{result['started_utc']}, load {machine['load_at_start'][0]:.1f} -> {machine['load_at_end'][0]:.1f}",
        fontsize=9,
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str]) -> int:
    source = Path(argv[0])
    out = Path(argv[1]) if len(argv) > 1 else source.with_suffix(".png")
    print(write_chart(json.loads(source.read_text()), out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
