"""The upload path under issue 12's rule: ``push`` of a file with every kind of bad cell, and text
that is not UTF-8 on the wire, cost only their rows; ``UploadResult`` carries the reject counts."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import grpc
import psycopg

from airflow_embedding_provider.ai_server.dataset import load_dataset
from airflow_embedding_provider.upload_server.client import dataset_chunks, upload
from airflow_embedding_provider.upload_server.service import UPLOAD_METHOD
from airflow_embedding_provider.wire import embedding_pb2
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkRaw
from dev.sample import write_sample
from dev.verify import compare
from tests.integration import bad_cells
from tests.integration.upload_server.conftest import StartServer, count_rows


def test_push_of_a_file_with_every_bad_cell_kind_stores_the_good_rows(
    upload_server: StartServer, pg_dsn: str, tmp_path: Path
) -> None:
    frame, expects = bad_cells.build(seed=13)
    pkl = tmp_path / "bad-cells.pkl"
    frame.to_pickle(pkl)
    server = upload_server()
    dataset = load_dataset(pkl)
    result = upload(server.target, dataset_chunks(dataset, 300), upload_id="bad-cells")
    bad = [e for e in expects if e.kind]
    assert not result.success and result.total_rows == len(dataset)
    assert result.rows_rejected == len(bad)
    assert dict(result.rejected_by_kind) == {
        k: sum(1 for e in bad if e.kind == k) for k in {e.kind for e in bad if e.kind}
    }
    assert f"{len(bad)} to the DLQ" in result.message and "invalid_exp_years: 6" in result.message
    bad_cells.check_outcome(pg_dsn, pkl, expects)

    # The CLI says the same in one line and exits 1; pushing again changes nothing.
    again = subprocess.run(
        [sys.executable, "-m", "airflow_embedding_provider.cli", "push", "--pkl", str(pkl), "--target", server.target],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 1
    [line] = [x for x in again.stderr.splitlines() if "error" in x]
    assert f"{len(bad)} to the DLQ" in line and "0 new, 0 changed" in line
    assert count_rows(pg_dsn, "recruit_embedding_dlq") == len(bad)


def test_text_that_is_not_utf8_costs_only_its_row(upload_server: StartServer, pg_dsn: str, tmp_path: Path) -> None:
    dataset = load_dataset(write_sample(tmp_path / "small.pkl", 40, seed=3))
    good = [m.SerializeToString() for m in dataset_chunks(dataset, 20)]
    vector = dataset.vectors[0].astype("<f4").tobytes()
    # Another AI team's encoder sent Latin-1 bytes in a string field: protobuf refuses the whole message.
    broken = RowChunkRaw(
        rows=[{"id": b"0190d3c4-0000-7000-8000-00000000abcd", "company_name": b"Caf\xe9 M\xfcller", "vector": vector}]
    ).SerializeToString()
    server = upload_server()
    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_unary(
            UPLOAD_METHOD, request_serializer=None, response_deserializer=embedding_pb2.UploadResult.FromString
        )
        # The bad row inside the first message, among its good rows; then the second message.
        result = call(iter([good[0] + broken, good[1]]), timeout=120)
    assert not result.success and result.total_rows == 41
    assert result.rows_rejected == 1 and dict(result.rejected_by_kind) == {"invalid_utf8": 1}
    assert "1 to the DLQ (invalid_utf8: 1)" in result.message
    with psycopg.connect(pg_dsn) as conn:
        check = compare(conn, dataset)
        [(row_id, kind, message, payload)] = conn.execute(
            "SELECT id::text, error_kind, error_message, payload FROM recruit_embedding_dlq"
        ).fetchall()
    assert check.equal, check.summary()
    assert (row_id, kind) == ("0190d3c4-0000-7000-8000-00000000abcd", "invalid_utf8")
    assert "company_name is not valid UTF-8" in message
    [defect] = payload["defects"]
    assert defect["column"] == "company_name"
    assert base64.b64decode(defect["value"]["base64"]) == b"Caf\xe9 M\xfcller"
    assert payload["company_name"] is None and len(payload["vector"]) == dataset.dimension
