"""Shared fixtures: a real PostgreSQL with pgvector, a real AI server, a throwaway Airflow home.

Every server listens on a free port of 127.0.0.1 and is stopped when its fixture ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Before anything imports Airflow: a throwaway home, no example DAGs.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airflow-test-home-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"

import pandas as pd
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset, load_dataset
from airflow_embedding_provider.ai_server.service import build_server
from airflow_embedding_provider.hooks.grpc_embedding import GrpcEmbeddingHook
from dev.embedded_postgres import EmbeddedPostgres
from dev.sample import make_sample

SAMPLE_ROWS = 3000


@pytest.fixture(scope="session")
def sample_frame() -> pd.DataFrame:
    return make_sample(SAMPLE_ROWS, seed=11)


@pytest.fixture(scope="session")
def sample_pkl(tmp_path_factory: pytest.TempPathFactory, sample_frame: pd.DataFrame) -> Path:
    path = tmp_path_factory.mktemp("data") / "sample.pkl"
    sample_frame.to_pickle(path)
    return path


@pytest.fixture(scope="session")
def sample_dataset(sample_pkl: Path) -> EmbeddingDataset:
    return load_dataset(sample_pkl)


@pytest.fixture(scope="session")
def postgres() -> Iterator[EmbeddedPostgres]:
    # Not under pytest's basetemp: pytest re-locks that to mode 0700 at each session start, and
    # PostgreSQL runs as another user when we are root.
    folder = Path(tempfile.mkdtemp(prefix="embedded-pg-"))
    server = EmbeddedPostgres(folder / "data").start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_dsn(postgres: EmbeddedPostgres, request: pytest.FixtureRequest) -> str:
    """A new, empty database for this test."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:50]
    return postgres.create_database(f"t_{name}")


def embedding_hook(
    monkeypatch: pytest.MonkeyPatch, target: str, conn_id: str = "embedding_grpc_test", **extra: object
) -> GrpcEmbeddingHook:
    """A hook over an ``embedding_grpc`` connection ``conn_id`` to ``host:port``, defined in the
    environment as a deployment would (``AIRFLOW_CONN_...``); ``extra`` goes to the connection."""
    host, port = target.rsplit(":", 1)
    monkeypatch.setenv(
        f"AIRFLOW_CONN_{conn_id.upper()}",
        json.dumps({"conn_type": "embedding_grpc", "host": host, "port": int(port), "extra": extra}),
    )
    return GrpcEmbeddingHook(conn_id)


def start_ai_server(dataset: EmbeddingDataset) -> tuple[object, str]:
    server, port = build_server(dataset, host="127.0.0.1", port=0)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def ai_server(sample_dataset: EmbeddingDataset) -> Iterator[str]:
    """An in-process AI server over the sample; yields ``host:port``."""
    server, target = start_ai_server(sample_dataset)
    yield target
    server.stop(0)  # type: ignore[attr-defined]
