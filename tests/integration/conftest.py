"""Fixtures of the integration tests: a migrated Airflow home and the reference API server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset, load_dataset
from dev.sample import write_sample
from dev.stack import ServerProcess, airflow_env, prepare_airflow_home

BIG_ROWS = 100_000  # the fault and cluster tests' source: 4 partitions of 25,000 rows


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated throwaway ``AIRFLOW_HOME`` (SQLite) for every DAG test of the session."""
    home = tmp_path_factory.mktemp("airflow-home")
    prepare_airflow_home(airflow_env(home, postgres_dsn="postgresql://unused", embedding_target="127.0.0.1:1"))
    return home


@pytest.fixture(scope="session")
def api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The reference API server (CacheService) as a process; its counters in ``stats.json``."""
    folder = tmp_path_factory.mktemp("api")
    server = ServerProcess(["api-server", "--stats-file", str(folder / "stats.json")], log_path=folder / "api.log")
    with server:
        yield server


@pytest.fixture(scope="session")
def big_pkl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample(tmp_path_factory.mktemp("big") / "big.pkl", BIG_ROWS, seed=23)


@pytest.fixture(scope="session")
def big_dataset(big_pkl: Path) -> EmbeddingDataset:
    return load_dataset(big_pkl)
