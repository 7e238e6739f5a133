"""``airflow-embedding upload-server`` and ``push`` as real processes over a real PostgreSQL."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset, load_dataset
from airflow_embedding_provider.digest import pack_hashes, unpack_hashes
from airflow_embedding_provider.storage.writer_budget import WriterBudget
from airflow_embedding_provider.upload_server.client import UploadError, dataset_chunks, upload
from airflow_embedding_provider.upload_server.service import SERVICE_NAME
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes
from dev.sample import make_sample, write_sample
from dev.stack import free_port
from dev.verify import compare, stored_rows
from tests.integration.upload_server.conftest import (
    GatedUpload,
    StartServer,
    count_rows,
    server_log,
    wait_for_log,
    wait_for_rows,
)

SEED_CLIENT = Path(__file__).resolve().parents[1] / "seed_client.py"


def push(pkl: Path, target: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow_embedding_provider.cli", "push", "--pkl", str(pkl), "--target", target, *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if "error" in line]


def test_push_of_50k_rows_ends_with_tables_equal_to_the_pkl(
    upload_server: StartServer, pg_dsn: str, tmp_path: Path
) -> None:
    pkl = write_sample(tmp_path / "50k.pkl", 50_000, seed=21)
    server = upload_server()
    result = push(pkl, server.target)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pushed 50000 rows" in result.stdout
    assert "stored 50000 (50000 new, 0 changed, 0 unchanged); 0 to the DLQ" in result.stdout
    dataset = load_dataset(pkl)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        comparison = compare(conn, dataset)
        assert comparison.equal, comparison.summary()
        # The same checkpoint code as the DAG, on the uploads' own row: the pull's stays untouched.
        rows = conn.execute("SELECT stream_name, last_processed_uuid::text FROM embedding_batch_checkpoint")
        checkpoints = {str(r[0]): str(r[1]) for r in rows}
        assert checkpoints == {"recruit_upload": dataset.ids[-1]}
        # ... and the same outbox: one pending invalidation of "recruit" for this upload.
        outbox = conn.execute("SELECT target, source FROM embedding_cache_outbox WHERE delivered_at IS NULL").fetchall()
        assert len(outbox) == 1 and outbox[0][0] == "recruit" and outbox[0][1].startswith("upload/")


def test_bad_rows_are_reported_and_dead_lettered(upload_server: StartServer, pg_dsn: str, tmp_path: Path) -> None:
    frame = make_sample(600, seed=5)
    vectors = [np.asarray(v, dtype=np.float32) for v in frame["job_post_vectors"]]
    vectors[0] = vectors[0].copy()
    vectors[0][7] = np.nan
    vectors[1] = np.ones(10, dtype=np.float32)
    frame["job_post_vectors"] = pd.Series(vectors, index=frame.index, dtype=object)
    frame.at[2, "id"] = "not-a-uuid"
    pkl = tmp_path / "bad.pkl"
    frame.to_pickle(pkl)
    server = upload_server()

    result = push(pkl, server.target)
    assert result.returncode == 1
    [line] = error_lines(result)
    assert "600 rows" in line and "stored 597 (597 new" in line and "3 to the DLQ" in line
    assert "dimension_mismatch: 1" in line and "invalid_id: 1" in line and "non_finite_vector: 1" in line
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        kinds = sorted(r[0] for r in conn.execute("SELECT error_kind FROM recruit_embedding_dlq"))
        assert kinds == ["dimension_mismatch", "invalid_id", "non_finite_vector"]
        comparison = compare(conn, load_dataset(pkl), ignore=[str(frame.at[0, "id"])])
        assert comparison.equal, comparison.summary()

    again = push(pkl, server.target)  # idempotent: nothing changes, the DLQ keeps one entry a row
    assert again.returncode == 1 and "(0 new, 0 changed, 597 unchanged)" in error_lines(again)[0]
    assert count_rows(pg_dsn, "recruit_embedding_dlq") == 3


def test_an_aborted_upload_keeps_what_was_committed_and_a_reupload_completes_it(
    upload_server: StartServer, pg_dsn: str, tmp_path: Path
) -> None:
    pkl = write_sample(tmp_path / "9k.pkl", 9000, seed=31)
    dataset = load_dataset(pkl)
    chunks = list(dataset_chunks(dataset, 300))
    server = upload_server()
    gated = GatedUpload(server.target, chunks, before_gate=10, upload_id="aborted-1")
    try:
        gated.wait_gated()
        wait_for_rows(pg_dsn, 3000)
        gated.cancel()
        with pytest.raises(grpc.FutureCancelledError):
            gated.result()
        match = wait_for_log(
            server,
            r"upload aborted-1 from \S+: aborted by the client after (\d+) rows in (\d+) chunks, "
            r"all committed; highest id (\S+)\.",
        )
    finally:
        gated.close()
    assert (int(match[1]), int(match[2]), match[3]) == (3000, 10, dataset.ids[2999])
    assert count_rows(pg_dsn) == 3000

    result = push(pkl, server.target)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stored 9000 (6000 new, 0 changed, 3000 unchanged)" in result.stdout
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert compare(conn, dataset).equal

    # Or resume after the logged position: only the rest is sent.
    resumed = push(pkl, server.target, "--after", dataset.ids[2999])
    assert resumed.returncode == 0 and "pushed 6000 rows" in resumed.stdout


def _versions(dataset: EmbeddingDataset) -> dict[str, tuple[tuple[object, ...], bytes]]:
    return {
        row_id: (
            (dataset.company_name[i], dataset.exp_years[i], dataset.english_level[i], dataset.primary_keyword[i]),
            dataset.vectors[i].astype("<f4").tobytes(),
        )
        for i, row_id in enumerate(dataset.ids)
    }


def test_concurrent_uploads_of_overlapping_ids_end_consistent(
    upload_server: StartServer, pg_dsn: str, tmp_path: Path
) -> None:
    """Last-writer semantics: each row (metadata and vector in one transaction) ends as one upload's
    version, whichever upload's sub-batch committed it last; never a mix of the two uploads."""
    frame = make_sample(12_000, seed=41)
    first = frame.iloc[:8000]
    second = frame.iloc[4000:].copy()
    second["Company Name"] = "second upload"
    second["job_post_vectors"] = pd.Series(
        [-np.asarray(v) for v in second["job_post_vectors"]], index=second.index, dtype=object
    )
    first.to_pickle(tmp_path / "a.pkl")
    second.to_pickle(tmp_path / "b.pkl")
    a, b = load_dataset(tmp_path / "a.pkl"), load_dataset(tmp_path / "b.pkl")
    server = upload_server("--db-connections", "3")

    results: dict[str, embedding_pb2.UploadResult | Exception] = {}

    def run(name: str, dataset: EmbeddingDataset) -> None:
        try:
            results[name] = upload(server.target, dataset_chunks(dataset, 200), upload_id=name)
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=run, args=(n, d)) for n, d in (("a", a), ("b", b))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    for name in ("a", "b"):
        result = results[name]
        assert isinstance(result, embedding_pb2.UploadResult) and result.success, result
        assert result.total_rows == 8000

    va, vb = _versions(a), _versions(b)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        stored = stored_rows(conn)
    assert set(stored) == set(va) | set(vb)
    overlap = set(va) & set(vb)
    assert len(overlap) == 4000
    for row_id, value in stored.items():
        allowed = [v[row_id] for v in (va, vb) if row_id in v]
        assert value in allowed, row_id


def test_a_client_built_from_the_seed_proto_uploads(
    upload_server: StartServer, pg_dsn: str, sample_pkl: Path, sample_dataset: EmbeddingDataset
) -> None:
    server = upload_server()
    result = subprocess.run(
        [sys.executable, str(SEED_CLIENT), "upload", server.target, str(sample_pkl), "250"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["success"] is True and answer["total_rows"] == len(sample_dataset)
    assert re.search(rf"{len(sample_dataset)} rows in 12 chunks; stored {len(sample_dataset)} \(", answer["message"])
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        comparison = compare(conn, sample_dataset)
        null_years = {r[0] for r in conn.execute("SELECT id::text FROM recruit_metadata WHERE exp_years IS NULL")}
    # Proto3 without ``optional`` cannot send exp_years = 0: a zero is not on the wire, and our
    # contract (``optional int32``) reads an absent field as NULL. Every other field and every
    # vector bit arrives exactly.
    zero_years = {
        row_id for row_id, years in zip(sample_dataset.ids, sample_dataset.exp_years, strict=True) if years == 0
    }
    assert zero_years and not comparison.missing and not comparison.unexpected
    assert set(comparison.differing) == zero_years == null_years


def test_sigterm_drains_an_upload_in_flight(upload_server: StartServer, pg_dsn: str, tmp_path: Path) -> None:
    dataset = load_dataset(write_sample(tmp_path / "12k.pkl", 12_000, seed=51))
    server = upload_server()
    gated = GatedUpload(server.target, list(dataset_chunks(dataset, 300)), before_gate=20, upload_id="draining")
    try:
        gated.wait_gated()
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        wait_for_log(server, r"shutting down: draining 1 upload")
        with pytest.raises(UploadError):  # no new uploads once the server is stopping
            upload(server.target, iter(list(dataset_chunks(dataset, 300))[:1]), connect_timeout=3)
        gated.gate.set()
        result = gated.result()
    finally:
        gated.close()
    assert result.success and result.total_rows == 12_000, result.message
    assert server.proc.wait(120) == 0
    assert count_rows(pg_dsn) == 12_000
    assert "stopped after" in server_log(server)


def test_uploads_beyond_the_limit_are_refused_and_health_is_served(
    upload_server: StartServer, pg_dsn: str, sample_dataset: EmbeddingDataset
) -> None:
    server = upload_server("--max-concurrent-uploads", "1")
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    chunks = list(dataset_chunks(sample_dataset, 300))
    gated = GatedUpload(server.target, chunks, before_gate=1, upload_id="holder")
    try:
        gated.wait_gated()
        wait_for_rows(pg_dsn, 300)
        with pytest.raises(UploadError, match="RESOURCE_EXHAUSTED"):
            upload(server.target, iter(chunks[:1]))
        gated.gate.set()
        assert gated.result().success
    finally:
        gated.close()
    assert upload(server.target, iter(chunks)).success  # the slot is free again


def test_push_to_an_unreachable_target_fails_with_one_line(tmp_path: Path) -> None:
    pkl = write_sample(tmp_path / "small.pkl", 10)
    result = push(pkl, f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().count("\n") == 0
    assert "push: error: cannot reach an upload server at 127.0.0.1:" in result.stderr


def test_push_of_a_missing_file_fails_with_one_line(tmp_path: Path) -> None:
    result = push(tmp_path / "missing.pkl", "127.0.0.1:1")
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert "no such file" in result.stderr


def test_a_pushers_row_hashes_are_not_stored_on_trust(upload_server: StartServer, pg_dsn: str, tmp_path: Path) -> None:
    # Every message claims hashes under this package's definition, right on its first and last
    # row (the two the pull side checks) and wrong in between: stored, they would tell a later
    # range sync that these rows equal rows they do not. The upload server hashes the rows itself.
    dataset = load_dataset(write_sample(tmp_path / "forged.pkl", 900, seed=23))

    def forged() -> Iterator[RowChunkBytes]:
        for message in dataset_chunks(dataset, 300):
            claimed = unpack_hashes(message.row_hashes)
            claimed[1:-1] ^= 1
            message.row_hashes = pack_hashes(claimed)
            yield message

    result = upload(upload_server().target, forged())
    assert result.success and result.total_rows == 900
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        stored: dict[str, int] = dict(conn.execute("SELECT id::text, row_hash FROM recruit_metadata").fetchall())
    assert stored == dict(zip(dataset.ids, dataset.row_hashes.tolist(), strict=True))


def test_an_upload_writes_on_its_share_of_the_databases_writer_budget(
    upload_server: StartServer, pg_dsn: str, tmp_path: Path
) -> None:
    # An ingest task of the DAG holds its place on this database (a real registration on its own
    # session): the upload gets half of a budget of 2 writers.
    pkl = write_sample(tmp_path / "budget.pkl", 3000, seed=31)
    server = upload_server("--db-connections", "3", "--db-writer-budget", "2")
    with psycopg.connect(pg_dsn, autocommit=True) as neighbour, WriterBudget(neighbour, budget=2, writers=4):
        result = push(pkl, server.target)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stored 3000 (3000 new, 0 changed, 0 unchanged); 0 to the DLQ" in result.stdout
    wait_for_log(
        server, r"writing on 1 of 3 connection\(s\) at once: a budget of 2 writer\(s\) over 2 ingest task\(s\)"
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        comparison = compare(conn, load_dataset(pkl))
        assert comparison.equal, comparison.summary()


def test_a_negative_writer_budget_stops_the_server_with_one_line(pg_dsn: str) -> None:
    command = ["upload-server", "--postgres-dsn", pg_dsn, "--port", str(free_port()), "--db-writer-budget", "-1"]
    result = subprocess.run(
        [sys.executable, "-m", "airflow_embedding_provider.cli", *command],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "airflow-embedding upload-server: error: db_writer_budget must be at least 1 writer (or 0 for none)"
    ]
