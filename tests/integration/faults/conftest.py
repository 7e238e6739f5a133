from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dev.embedded_postgres import EmbeddedPostgres
from dev.stack import ServerProcess


@pytest.fixture
def own_postgres() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test alone, so that it may be restarted or killed."""
    folder = Path(tempfile.mkdtemp(prefix="embedded-pg-fault-"))
    server = EmbeddedPostgres(folder / "data").start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def big_ai_server(big_pkl: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess(["ai-server", "--pkl", str(big_pkl)], log_path=tmp_path / "ai.log") as server:
        yield server
