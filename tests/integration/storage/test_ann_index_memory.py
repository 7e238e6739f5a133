"""The ANN index build sizes its own memory: one large build on a server with PostgreSQL's defaults.

A user's server has ``maintenance_work_mem`` = 64 MB (the embedded one runs with 512 MB). ivfflat's
k-means needs samples x lists floats besides the samples themselves (storage/schema.py), so
600,000 rows (600 lists) of 64-d need about 80 MB: the build stops with "memory required is ..."
unless it raises the setting for its own transaction. 64-d keeps the table small (150 MB); the
memory depends on the lists as much as on the dimension.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psycopg
import pytest
from pgvector.psycopg import register_vector

from airflow_embedding_provider.storage.schema import (
    DEFAULT_TABLES,
    apply_schema,
    ensure_ann_index,
    hnsw_build_bytes,
    ivfflat_build_bytes,
)
from dev.embedded_postgres import EmbeddedPostgres

ROWS = 600_000
DIMENSION = 64


@pytest.fixture(scope="module")
def default_server() -> Iterator[EmbeddedPostgres]:
    folder = Path(tempfile.mkdtemp(prefix="embedded-pg-defaults-"))
    server = EmbeddedPostgres(folder / "data", settings={"maintenance_work_mem": None}).start()
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def _load(conn: psycopg.Connection, rows: int) -> None:
    register_vector(conn)
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((rows, DIMENSION), dtype=np.float32)
    ids = [uuid.UUID(int=i + 1) for i in range(rows)]
    with conn.transaction(), conn.cursor() as cur:
        with cur.copy("COPY recruit_metadata (id) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["uuid"])
            for i in ids:
                copy.write_row((i,))
        with cur.copy("COPY recruit_embedding (id, vector) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["uuid", "vector"])
            for i, v in zip(ids, vectors, strict=True):
                copy.write_row((i, v))


def test_a_large_ivfflat_build_succeeds_on_a_server_with_default_maintenance_work_mem(
    default_server: EmbeddedPostgres,
) -> None:
    dsn = default_server.create_database("defaults")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("SHOW maintenance_work_mem").fetchone() == ("64MB",)
        apply_schema(conn, DIMENSION)
        _load(conn, ROWS)
        needed = ivfflat_build_bytes(ROWS, DIMENSION, ROWS // 1000)
        assert needed > 64 << 20, "the build must need more than the default, or the test proves nothing"
        assert ensure_ann_index(conn, DEFAULT_TABLES, "ivfflat") is True
        assert conn.execute("SELECT to_regclass('recruit_embedding_ivfflat') IS NOT NULL").fetchone() == (True,)
        # SET LOCAL: the session (and the server) keep their own setting.
        assert conn.execute("SHOW maintenance_work_mem").fetchone() == ("64MB",)


def test_the_build_memory_is_bounded(default_server: EmbeddedPostgres) -> None:
    """Past ``max_build_memory`` the build gets no more than that: here pgvector's own refusal."""
    dsn = default_server.create_database("bounded")
    with psycopg.connect(dsn, autocommit=True) as conn:
        apply_schema(conn, DIMENSION)
        _load(conn, ROWS)
        with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="memory required is"):
            ensure_ann_index(conn, DEFAULT_TABLES, "ivfflat", max_build_memory="64MB")


def test_estimates_grow_with_the_graph_and_the_lists() -> None:
    assert hnsw_build_bytes(141_897, 384) > 256 << 20  # the HNSW graph of the seed's rows: ~300 MB
    assert ivfflat_build_bytes(1_000_000, 384, 1000) > 250 << 20  # the 272 MB pgvector asked for at 1M
