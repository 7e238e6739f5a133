from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset, load_dataset
from airflow_embedding_provider.devkit.embedded_postgres import EmbeddedPostgres
from airflow_embedding_provider.devkit.sample import write_sample

BIG_ROWS = 100_000


@pytest.fixture(scope="session")
def big_pkl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sample(tmp_path_factory.mktemp("big") / "big.pkl", BIG_ROWS, seed=23)


@pytest.fixture(scope="session")
def big_dataset(big_pkl: Path) -> EmbeddingDataset:
    return load_dataset(big_pkl)


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test alone, so that it may be restarted or killed."""
    folder = Path(tempfile.mkdtemp(prefix="embedded-pg-fault-"))
    server = EmbeddedPostgres(folder / "data").start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)
