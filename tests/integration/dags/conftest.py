from __future__ import annotations

from pathlib import Path

import pytest

from airflow_embedding_provider.devkit.stack import airflow_env, prepare_airflow_home


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated throwaway ``AIRFLOW_HOME`` (SQLite) for every DAG test of the session."""
    home = tmp_path_factory.mktemp("airflow-home")
    prepare_airflow_home(airflow_env(home, postgres_dsn="postgresql://unused", embedding_target="127.0.0.1:1"))
    return home


@pytest.fixture
def dag_env(airflow_home: Path, pg_dsn: str, ai_server: str) -> dict[str, str]:
    """Environment for ``airflow dags test`` against this test's database and AI server."""
    return airflow_env(
        airflow_home, postgres_dsn=pg_dsn, embedding_target=ai_server, extra={"RECRUIT_EMBEDDING_RETRIES": "0"}
    )
