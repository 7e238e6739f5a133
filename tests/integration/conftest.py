"""Fixtures of the integration tests: a migrated Airflow home and the reference API server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_embedding_provider.devkit.stack import ServerProcess, airflow_env, prepare_airflow_home


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
