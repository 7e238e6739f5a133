"""GrpcEmbeddingHook against a real AI server; the connection comes from AIRFLOW_CONN_*."""

from __future__ import annotations

import numpy as np
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from dev.stack import free_port
from tests.conftest import embedding_hook


def test_streams_decoded_chunks(
    monkeypatch: pytest.MonkeyPatch, ai_server: str, sample_dataset: EmbeddingDataset
) -> None:
    hook = embedding_hook(monkeypatch, ai_server)
    after = sample_dataset.ids[99]
    chunks = list(hook.stream_chunks(after=after, chunk_size=400))
    hook.close()
    assert [len(c) for c in chunks] == [400] * 7 + [100]
    assert [i for c in chunks for i in c.ids] == sample_dataset.ids[100:]
    vectors = np.frombuffer(b"".join(v for c in chunks for v in c.vectors), dtype="<f4")
    assert vectors.tobytes() == sample_dataset.vectors[100:].tobytes()


def test_test_connection_reports_serving(monkeypatch: pytest.MonkeyPatch, ai_server: str) -> None:
    ok, message = embedding_hook(monkeypatch, ai_server, timeout=5).test_connection()
    assert ok and message == f"{ai_server}: SERVING"


def test_test_connection_reports_a_dead_server(monkeypatch: pytest.MonkeyPatch) -> None:
    ok, message = embedding_hook(monkeypatch, f"127.0.0.1:{free_port()}", timeout=2).test_connection()
    assert not ok and "UNAVAILABLE" in message


def test_settings_come_from_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = embedding_hook(
        monkeypatch, "10.0.0.1:7000", use_tls="true", token="s3cret", timeout="2.5", ca_cert="/etc/ca.pem"
    )
    settings = hook.settings
    assert (settings.target, settings.use_tls, settings.token, settings.timeout, settings.ca_cert) == (
        "10.0.0.1:7000",
        True,
        "s3cret",
        2.5,
        "/etc/ca.pem",
    )
    assert settings.metadata() == []  # over TLS the token travels as call credentials, not metadata
