"""The upload server takes its DSN from a file or the environment, so that the password is not in
its command line (``ps``, ``docker inspect``): real server processes over a real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.cli import POSTGRES_DSN_ENV
from airflow_embedding_provider.upload_server.client import dataset_chunks, upload
from dev.stack import ServerProcess
from tests.integration.upload_server.conftest import count_rows


def command_line(server: ServerProcess) -> str:
    assert server.proc is not None
    return Path(f"/proc/{server.proc.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


@pytest.mark.parametrize("source", ["file", "environment"])
def test_the_upload_server_stores_an_upload_with_a_dsn_kept_out_of_its_command_line(
    source: str, pg_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sample_dataset: EmbeddingDataset
) -> None:
    args = ["upload-server"]
    if source == "file":
        secret = tmp_path / "dsn"
        secret.write_text(pg_dsn + "\n", encoding="utf-8")
        args += ["--postgres-dsn-file", str(secret)]
        monkeypatch.delenv(POSTGRES_DSN_ENV, raising=False)
    else:
        monkeypatch.setenv(POSTGRES_DSN_ENV, pg_dsn)
    with ServerProcess(args, log_path=tmp_path / "upload.log") as server:
        assert pg_dsn not in command_line(server)
        result = upload(server.target, iter(list(dataset_chunks(sample_dataset, 300))[:2]), timeout=120)
    assert result.success, result.message
    assert count_rows(pg_dsn) == 600
