"""``ReportRejects`` and ``GetServerStatus`` through the hook against real servers: the batch side
tells the AI server what it rejected; a server without the call costs a warning, not the task."""

from __future__ import annotations

import logging
from concurrent import futures
from pathlib import Path

import pytest
from airflow.sdk import BaseOperator

from airflow_embedding_provider.ai_server.dataset import load_dataset
from airflow_embedding_provider.ai_server.service import SERVICE_NAME
from airflow_embedding_provider.grpc_server import add_health, bind_port, new_server
from airflow_embedding_provider.hooks.grpc_embedding import REPORT_ROWS_PER_CALL
from airflow_embedding_provider.operators.embedding_stream import _report_rejects
from airflow_embedding_provider.pipeline import IngestStats
from dev.sample import write_sample
from tests.conftest import embedding_hook, start_ai_server


def test_rejects_are_reported_in_batches_and_counted_once_per_id(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dataset = load_dataset(write_sample(tmp_path / "s.pkl", 50, dimension=4, odd_cell=True))
    server, target = start_ai_server(dataset)
    try:
        hook = embedding_hook(monkeypatch, target, timeout=10)
        rejects = [
            (f"00000000-0000-4000-8000-{i:012d}", "dimension_mismatch", "vector has 3 dimensions") for i in range(4500)
        ]
        rejects.append(("", "invalid_id", "id 'caf\ud800' is not a UUID"))  # text that UTF-8 cannot carry
        assert 2 * REPORT_ROWS_PER_CALL < 4500
        assert hook.report_rejects(source="test/0", rows_received=5000, rejects=rejects) == 4501
        # A retried partition reports the same rows again: counted once per id.
        hook.report_rejects(source="test/0", rows_received=5000, rejects=rejects[:100])
        status = hook.server_status()
        hook.close()
    finally:
        server.stop(0)  # type: ignore[attr-defined]
    assert status.rows == 50 and status.dimension == 4 and status.reports == 4  # 3 calls, then 1
    assert {c.error_kind: c.rows for c in status.rejects} == {"dimension_mismatch": 4500, "invalid_id": 1}
    assert [(c.column, c.error_kind, c.rows) for c in status.defects] == [("Exp Years", "invalid_exp_years", 1)]
    assert "Published" in status.ignored_columns


def test_a_server_without_report_rejects_costs_a_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    server = new_server(futures.ThreadPoolExecutor(max_workers=2))
    add_health(server, SERVICE_NAME)  # healthy, but an older server: no ReportRejects
    port = bind_port(server, "127.0.0.1", 0)
    server.start()
    try:
        hook = embedding_hook(monkeypatch, f"127.0.0.1:{port}", timeout=10)
        stats = IngestStats(rows_received=10)
        stats.rejects.append(("00000000-0000-4000-8000-000000000001", "invalid_exp_years", "column 'Exp Years' ..."))
        operator = BaseOperator(task_id="probe")
        with caplog.at_level(logging.WARNING):
            _report_rejects(operator, hook, "test/1", stats)  # does not raise
        hook.close()
    finally:
        server.stop(0)
    # The task logger writes through Airflow's structlog set-up (stdout) or the logging module.
    logged = caplog.text + capsys.readouterr().out
    assert "could not report 1 rejected row(s) to the AI server: UNIMPLEMENTED" in logged
