"""Peak memory of loading the sample into the AI server's layout, per input path, as a ratio to
the float32 matrix the server keeps (the target: Parquet at most 2x the matrix at 1,000,000 rows).

For each path a fresh process imports the loader, notes its resident size, loads the file with
``load_dataset`` and reports its peak resident size (``VmHWM``). The ratio that the target reads
is that whole peak over the matrix; the peak less the process's size before loading is shown too.

    python -m bench.load_memory [--rows N] [--dim D] [--paths parquet,pickle,pickle-trusted]

``pickle-trusted`` is ``--trust-pickle`` (the C unpickler, no checks): what the checks cost.
The sample files are written once into WORKDIR (``.bench`` by default) and reused.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from airflow_embedding_provider.rows import DEFAULT_DIMENSION
from bench.procmem import MIB, peak_rss_mib, rss_mib
from dev.stack import REPO_ROOT

PATHS = {"parquet": ".parquet", "pickle": ".pkl", "pickle-trusted": ".pkl"}
#: loading Parquet peaks at most at twice the float32 matrix
PARQUET_PEAK_LIMIT = 2.0
SEED = 7


def _child_load(path: Path, trust_pickle: bool) -> dict[str, Any]:
    from airflow_embedding_provider.ai_server.dataset import load_dataset

    before = rss_mib() or 0.0
    started = time.perf_counter()
    data = load_dataset(path, trust_pickle=trust_pickle)
    seconds = time.perf_counter() - started
    return {
        "rows": len(data),
        "dimension": data.dimension,
        "seconds": seconds,
        "rss_before_mib": before,
        "rss_after_mib": rss_mib(),
        "peak_mib": peak_rss_mib(),
    }


def _child_write(path: Path, rows: int, dimension: int) -> dict[str, Any]:
    from dev.sample import write_sample

    write_sample(path, rows, dimension=dimension, seed=SEED)
    return {"bytes": path.stat().st_size}


def _run_child(*args: str) -> dict[str, Any]:
    run = subprocess.run(
        [sys.executable, "-m", "bench.load_memory", "--child", *args], capture_output=True, text=True, cwd=REPO_ROOT
    )
    if run.returncode != 0:
        raise SystemExit(f"bench child {args} failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def measure(rows: int, dimension: int, paths: list[str], workdir: Path) -> list[dict[str, Any]]:
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in paths:
        sample = workdir / f"load-sample-{rows}x{dimension}-seed{SEED}{PATHS[name]}"
        if not sample.exists():
            partial = sample.with_name(sample.name + ".partial" + PATHS[name])
            _run_child("write", str(partial), str(rows), str(dimension))
            partial.rename(sample)
        result = _run_child("load", str(sample), "trust" if name == "pickle-trusted" else "checked")
        result.update(path=name, file_mib=sample.stat().st_size / MIB)
        results.append(result)
    return results


def render(results: list[dict[str, Any]], rows: int, dimension: int) -> str:
    matrix_mib = rows * dimension * 4 / MIB
    lines = [
        f"rows: {rows:,}, dimension {dimension}; float32 matrix {matrix_mib:,.0f} MiB",
        "",
        "| path | file MiB | load s | RSS before load MiB | peak RSS MiB | peak / matrix | (peak - before) / matrix | RSS after load MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['path']} | {r['file_mib']:,.0f} | {r['seconds']:.1f} | {r['rss_before_mib']:,.0f} | "
            f"{r['peak_mib']:,.0f} | {r['peak_mib'] / matrix_mib:.2f}x | "
            f"{(r['peak_mib'] - r['rss_before_mib']) / matrix_mib:.2f}x | {r['rss_after_mib']:,.0f} |"
        )
    for r in results:
        if r["path"] == "parquet":
            ratio = r["peak_mib"] / matrix_mib
            verdict = "PASS" if ratio <= PARQUET_PEAK_LIMIT else "MISS"
            lines += ["", f"target: Parquet peak RSS / matrix {ratio:.2f}x, limit <= {PARQUET_PEAK_LIMIT:g}: {verdict}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=DEFAULT_DIMENSION)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".bench")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "write":
            out = _child_write(Path(rest[0]), int(rest[1]), int(rest[2]))
        else:
            out = _child_load(Path(rest[0]), trust_pickle=rest[1] == "trust")
        print(json.dumps(out))
        return 0
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown path(s) {sorted(unknown)}; choose from {', '.join(PATHS)}")
    results = measure(args.rows, args.dim, paths, args.workdir)
    print(render(results, args.rows, args.dim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
