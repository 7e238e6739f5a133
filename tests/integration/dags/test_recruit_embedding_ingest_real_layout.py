"""Real source files through the real ingest DAG (issue 12): the Djinni layout as the generator
writes it, and every kind of cell the audit found among good rows. Every source row ends stored as
the source says or in the DLQ with its column, reason and original value; nothing else; the AI
server never stops, and a client compiled from the seed's proto text reads the good rows unchanged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import load_dataset
from airflow_embedding_provider.wire import embedding_pb2, embedding_pb2_grpc
from dev.sample import DJINNI_COLUMNS, ODD_EXP_YEARS, make_sample, write_sample
from dev.stack import ServerProcess, airflow_env, dags_test, task_result
from dev.verify import compare, stored_rows
from tests.conftest import start_ai_server
from tests.integration import bad_cells

DAG_ID = "recruit_embedding_ingest"
SEED_CLIENT = Path(__file__).resolve().parents[1] / "seed_client.py"


def _dlq(dsn: str) -> list[tuple[str | None, str, str, dict[str, Any]]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT id::text, error_kind, error_message, payload FROM recruit_embedding_dlq").fetchall()


def _status(target: str) -> Any:
    with grpc.insecure_channel(target) as channel:
        stub = embedding_pb2_grpc.EmbeddingStreamServiceStub(channel)
        return stub.GetServerStatus(embedding_pb2.ServerStatusRequest(), timeout=30)


def test_a_20000_row_djinni_file_from_the_generator_loads_whole(
    tmp_path: Path, airflow_home: Path, pg_dsn: str, api_server: ServerProcess
) -> None:
    pkl = write_sample(tmp_path / "djinni.pkl", 20_000, seed=120, odd_cell=True)
    frame = make_sample(20_000, seed=120, odd_cell=True)
    assert list(frame.columns) == list(DJINNI_COLUMNS)
    assert frame["Exp Years"].map(type).eq(str).all() and (frame["Exp Years"] == "no_exp").sum() > 1000  # type: ignore[arg-type]
    assert {uuid.UUID(i).version for i in frame["id"]} == {4}
    dataset = load_dataset(pkl)
    log = tmp_path / "ai.log"
    with ServerProcess(["ai-server", "--pkl", str(pkl)], log_path=log) as ai:
        env = airflow_env(
            airflow_home, postgres_dsn=pg_dsn, embedding_target=ai.target, cache_target=api_server.target,
            extra={"RECRUIT_EMBEDDING_RETRIES": "0"},
        )  # fmt: skip
        dags_test(DAG_ID, env, conf={"rows_per_partition": 5000})
        status = _status(ai.target)
    text = log.read_text()
    # Extra columns named once; defective rows counted per column and reason at start-up.
    assert text.count("ignoring 5 column(s) beyond the design's six: 'Position', 'Long Description'") == 1
    assert "1 defective row(s), served marked for the DLQ: 'Exp Years' invalid_exp_years: 1" in text
    # The batch side reported the reject after its partition; the server counts it.
    assert "ReportRejects from" in text and "invalid_exp_years 1" in text
    assert [(c.error_kind, c.rows) for c in status.rejects] == [("invalid_exp_years", 1)]
    assert [(c.column, c.error_kind, c.rows) for c in status.defects] == [("Exp Years", "invalid_exp_years", 1)]

    odd_id = str(frame.loc[20_000 // 3, "id"])
    [(dlq_id, kind, message, payload)] = _dlq(pg_dsn)
    assert (dlq_id, kind) == (odd_id, "invalid_exp_years")
    assert "'Exp Years'" in message and repr(ODD_EXP_YEARS) in message
    assert payload["defects"][0]["column"] == "Exp Years" and payload["defects"][0]["value"] == ODD_EXP_YEARS
    assert payload["company_name"] == frame.loc[20_000 // 3, "Company Name"] and len(payload["vector"]) == 384
    with psycopg.connect(pg_dsn) as conn:
        check = compare(conn, dataset)
        stored = stored_rows(conn)
    assert check.equal, check.summary()
    assert len(stored) == 19_999 and odd_id not in stored  # every row in exactly one place
    years = dict(zip(frame["id"], frame["Exp Years"], strict=True))
    assert all(stored[i][0][1] == (0 if years[i] == "no_exp" else int(years[i][:-1])) for i in stored)
    summary = task_result(airflow_home, DAG_ID, "finalize")
    assert summary["rows_dlq"] == 1 and summary["dlq_by_reason"] == {"invalid_exp_years": 1}


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bad_cells.Expect]]:
    frame, expects = bad_cells.build()
    path = tmp_path_factory.mktemp("bad") / "bad-cells.pkl"
    frame.to_pickle(path)
    return path, expects


def test_every_kind_of_bad_cell_costs_only_its_row(
    bad_file: tuple[Path, list[bad_cells.Expect]], airflow_home: Path, pg_dsn: str, api_server: ServerProcess
) -> None:
    pkl, expects = bad_file
    dataset = load_dataset(pkl)
    server, target = start_ai_server(dataset)
    try:
        env = airflow_env(
            airflow_home, postgres_dsn=pg_dsn, embedding_target=target, cache_target=api_server.target,
            extra={"RECRUIT_EMBEDDING_RETRIES": "0"},
        )  # fmt: skip
        # No retries: a row that stalled a stream would fail the run. 21 of 3046 rows is within 5%.
        dags_test(DAG_ID, env, conf={"rows_per_partition": 1000})
        bad_cells.check_outcome(pg_dsn, pkl, expects)
        summary = task_result(airflow_home, DAG_ID, "finalize")
        assert summary["rows_dlq"] == sum(1 for e in expects if e.kind)

        # The seed-proto client, from the same server: every good row exactly as the dataset has it.
        result = subprocess.run(
            [sys.executable, str(SEED_CLIENT), "get", target, "", "300"],
            capture_output=True, text=True, timeout=300, check=True,
        )  # fmt: skip
        seen = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(seen) == len(dataset)
        for i, row in enumerate(seen):
            if i in dataset.defects:
                assert row["vector"] == ""  # held in a field the seed's text does not know
                continue
            assert row["id"] == dataset.ids[i]
            assert row["company_name"] == (dataset.company_name[i] or "")
            assert row["exp_years"] == (dataset.exp_years[i] or 0)
            if i >= dataset.invalid_prefix and i not in dataset.odd_vectors:
                assert bytes.fromhex(row["vector"]) == dataset.vectors[i].astype("<f4").tobytes()
    finally:
        server.stop(0)  # type: ignore[attr-defined]


def test_refetch_replays_defective_rows_cleanly_once_the_file_is_fixed(
    tmp_path: Path, airflow_home: Path, pg_dsn: str, api_server: ServerProcess
) -> None:
    frame = make_sample(600, seed=77).astype({"Exp Years": object, "Company Name": object})
    good_vector = frame.at[100, "job_post_vectors"]
    broken = {5: ("Exp Years", "ten", "3y"), 50: ("Company Name", "Caf\ud800", "Café"), 100: ("job_post_vectors", "0.1", good_vector)}  # fmt: skip
    bad, fixed = frame.copy(), frame.copy()
    for i, (column, wrong, right) in broken.items():
        bad.at[i, column] = wrong
        fixed.at[i, column] = right  # type: ignore[assignment]
    bad.to_pickle(tmp_path / "bad.pkl")
    fixed.to_pickle(tmp_path / "fixed.pkl")
    ids = {str(frame.at[i, "id"]) for i in broken}

    def env_for(target: str) -> dict[str, str]:
        return airflow_env(
            airflow_home, postgres_dsn=pg_dsn, embedding_target=target, cache_target=api_server.target,
            extra={"RECRUIT_EMBEDDING_RETRIES": "0"},
        )  # fmt: skip

    server, target = start_ai_server(load_dataset(tmp_path / "bad.pkl"))
    try:
        dags_test(DAG_ID, env_for(target))
        assert {r[0] for r in _dlq(pg_dsn)} == ids
        # Replaying the stored payloads cannot help: the cells are not in them, the rows fail again.
        dags_test("recruit_embedding_dlq_replay", env_for(target), conf={"refetch": False})
        plain = task_result(airflow_home, "recruit_embedding_dlq_replay", "replay")
        assert (plain["selected"], plain["resolved"], plain["still_failing"]) == (3, 0, 3)
    finally:
        server.stop(0)  # type: ignore[attr-defined]

    fixed_dataset = load_dataset(tmp_path / "fixed.pkl")
    server, target = start_ai_server(fixed_dataset)
    try:
        dags_test("recruit_embedding_dlq_replay", env_for(target), conf={"refetch": True})
        result = task_result(airflow_home, "recruit_embedding_dlq_replay", "replay")
        assert (result["selected"], result["resolved"], result["refetched"], result["still_failing"]) == (3, 3, 3, 0)
        assert result["resolved_by_reason"] == {"invalid_exp_years": 1, "unencodable_text": 1, "invalid_vector": 1}
        with psycopg.connect(pg_dsn) as conn:
            check = compare(conn, fixed_dataset)
            pending = conn.execute("SELECT count(*) FROM recruit_embedding_dlq WHERE status = 'pending'").fetchone()
        assert check.equal, check.summary()  # the three rows as the fixed file has them, bit-exact
        assert pending == (0,)
        dags_test("recruit_embedding_dlq_replay", env_for(target), conf={"refetch": True})
        assert task_result(airflow_home, "recruit_embedding_dlq_replay", "replay")["selected"] == 0
    finally:
        server.stop(0)  # type: ignore[attr-defined]
