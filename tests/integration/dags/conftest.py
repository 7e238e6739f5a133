from __future__ import annotations

from pathlib import Path

import pytest

from dev.stack import ServerProcess, airflow_env


@pytest.fixture
def dag_env(airflow_home: Path, pg_dsn: str, ai_server: str, api_server: ServerProcess) -> dict[str, str]:
    """Environment for ``airflow dags test`` against this test's database and servers."""
    return airflow_env(
        airflow_home,
        postgres_dsn=pg_dsn,
        embedding_target=ai_server,
        cache_target=api_server.target,
        extra={"RECRUIT_EMBEDDING_RETRIES": "0"},
    )
