"""``make demo``: the main job end to end on this machine, with real parts only.

Starts an embedded PostgreSQL with pgvector (unless ``--dsn`` names one), writes a sample ``.pkl``
in the real dataset's layout with one deliberately odd cell (which ends in the DLQ with its reason),
starts the AI server on it, runs ``recruit_embedding_ingest`` twice with ``airflow dags test`` in a
throwaway ``AIRFLOW_HOME`` (a scheduled-style run that loads everything, then a triggered run that
resumes after an id in the middle and finds nothing changed), checks the tables against the pkl,
prints the figures, and stops what it started.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import psycopg

from airflow_embedding_provider.ai_server.dataset import load_dataset
from dev.api_server.service import read_stats
from dev.embedded_postgres import EmbeddedPostgres
from dev.sample import ODD_EXP_YEARS, write_sample
from dev.stack import (
    REPO_ROOT,
    ServerProcess,
    airflow_env,
    dags_test,
    prepare_airflow_home,
    task_result,
)
from dev.verify import compare

DAG_ID = "recruit_embedding_ingest"


def describe(label: str, result: dict[str, Any]) -> str:
    return (
        f"{label}: {result['partitions']} partition(s), received {result['rows_received']} rows -> "
        f"{result['inserted']} new, {result['updated']} changed, {result['unchanged']} unchanged, "
        f"{result['rows_dlq']} to the DLQ; {result['chunks']} chunks; {result['task_rows_per_second']:.0f} rows/s inside the ingest tasks, {result['seconds']:.1f} s for the "
        "whole DAG run"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument(
        "--dsn", default="", help="use this PostgreSQL (pgvector installed) instead of the embedded one"
    )
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".demo")
    args = parser.parse_args(argv)
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    with ExitStack() as stack:
        if args.dsn:
            dsn = args.dsn
            print(f"PostgreSQL: {dsn.split('@')[-1]} (given)")
        else:
            pg = stack.enter_context(EmbeddedPostgres(workdir / "pgdata"))
            dsn = pg.create_database("recruit_demo")  # anew each time: two demos give the same tables
            with psycopg.connect(dsn) as conn:  # the wheel's own versions, not a number written here
                versions = conn.execute(
                    "SELECT current_setting('server_version'), "
                    "(SELECT default_version FROM pg_available_extensions WHERE name = 'vector')"
                ).fetchone()
            assert versions is not None
            print(f"PostgreSQL: embedded {versions[0]} + pgvector {versions[1]} at {dsn}")
        pkl = workdir / f"sample-djinni-{args.rows}.pkl"
        if not pkl.exists():
            write_sample(pkl, args.rows, odd_cell=True)
        dataset = load_dataset(pkl)
        print(
            f"sample: {pkl} ({len(dataset)} rows in the Djinni layout, dimension {dataset.dimension}; "
            f"{dataset.describe_defects()})"
        )
        ai = stack.enter_context(ServerProcess(["ai-server", "--pkl", str(pkl)], log_path=workdir / "ai-server.log"))
        print(f"AI server: {ai.target} (log {workdir / 'ai-server.log'})")
        stats_file = workdir / "api-server-stats.json"
        api = stack.enter_context(
            ServerProcess(["api-server", "--stats-file", str(stats_file)], log_path=workdir / "api-server.log")
        )
        print(f"API server (CacheService, reference): {api.target}")

        home = Path(tempfile.mkdtemp(prefix="airflow-home-", dir=workdir))
        stack.callback(shutil.rmtree, home, ignore_errors=True)
        env = airflow_env(home, postgres_dsn=dsn, embedding_target=ai.target, cache_target=api.target)
        prepare_airflow_home(env)

        per_partition = max(1000, -(-len(dataset) // 4))
        print(
            f"\nrun 1: airflow dags test {DAG_ID} --conf '{{\"rows_per_partition\": {per_partition}}}'"
            "  (after the stored checkpoint: none yet)"
        )
        dags_test(DAG_ID, env, conf={"rows_per_partition": per_partition})
        first = task_result(home, DAG_ID, "finalize")
        print("  " + describe("run 1", first))

        middle = dataset.ids[len(dataset) // 2]
        print(f'\nrun 2: airflow dags test {DAG_ID} --conf \'{{"last_processed_uuid": "{middle}"}}\'')
        dags_test(DAG_ID, env, conf={"last_processed_uuid": middle})
        second = task_result(home, DAG_ID, "finalize")
        print("  " + describe("run 2", second))

        with psycopg.connect(dsn) as conn:
            counts = {
                t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]  # type: ignore[index]
                for t in ("recruit_metadata", "recruit_embedding", "recruit_embedding_dlq")
            }
            checkpoint = conn.execute(
                "SELECT last_processed_uuid::text FROM embedding_batch_checkpoint WHERE stream_name = 'recruit'"
            ).fetchone()
            check = compare(conn, dataset)
            dlq_rows = conn.execute(
                "SELECT id::text, error_kind, error_message, payload->'defects'->0->'value' FROM recruit_embedding_dlq"
            ).fetchall()
        invalidations = read_stats(stats_file).invalidations.get("recruit", 0)

    print("\n== demo result ==")
    for table, count in counts.items():
        print(f"  {table:<24} {count:>9} rows")
    print(
        f"  checkpoint               {checkpoint[0] if checkpoint else None}  (last id in the pkl: {dataset.ids[-1]})"
    )
    print(
        f"  throughput (run 1)       {first['task_rows_per_second']:.0f} rows/s inside the ingest tasks; "
        f"{first['rows_per_second']:.0f} rows/s over the DAG run, Airflow's fixed start-up included (make bench)"
    )
    print(f"  cache invalidations      {invalidations} (run 1 changed rows; run 2 changed none)")
    print(f"  check                    {check.summary()}")
    for row_id, kind, message, value in dlq_rows:
        print(f"  DLQ row                  {row_id} {kind}: {message} (in the file: {value!r})")
    print(f"  wall time                {time.monotonic() - began:.1f} s for the whole demo")
    if not args.dsn:
        print(
            "\nThe embedded server is stopped again; its data stays in .demo/pgdata. Query it with\n"
            '  make query SQL="SELECT primary_keyword, count(*) FROM recruit_metadata GROUP BY 1 ORDER BY 2 DESC"\n'
            '  make query SQL="SELECT m.company_name, e.vector <-> (SELECT vector FROM recruit_embedding LIMIT 1) AS d '
            'FROM recruit_embedding e JOIN recruit_metadata m USING (id) ORDER BY d LIMIT 5"'
        )
    # Every row in exactly one place: the odd one in the DLQ with its original value, the rest stored.
    expected_dlq = [(kind, value) for _, kind, _, value in dlq_rows] == [("invalid_exp_years", ODD_EXP_YEARS)]
    stored_all = counts["recruit_metadata"] == len(dataset) - len(dataset.defects)
    return 0 if check.equal and stored_all and expected_dlq else 1


if __name__ == "__main__":
    sys.exit(main())
