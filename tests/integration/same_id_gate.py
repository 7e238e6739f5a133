"""A real PostgreSQL gate that forces the race of two copies of one id in two chunks.

Parallel writers used to race: the newer copy's COPY committed first, the older copy's COPY then
hit the primary key, retried as an upsert and overwrote the newer row. The gate below is real
PostgreSQL: a trigger makes the write of the *older* copy wait for an advisory lock this test
holds, and the test lets it go only once the newer copy is visible (or after a bounded wait, when
the code orders the writes and the newer copy never overtakes). Without ordering the interleaving
"newer commits, then older" happens every time, not by luck.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import numpy as np
import psycopg

from airflow_embedding_provider.wire.codec import encode_rows
from airflow_embedding_provider.wire.embedding_bytes_view_pb2 import RowChunkBytes
from dev.sample import uuid7_strings

DIM = 384
GATE_KEY = 716_016
OLDER, NEWER = "older version", "newer version"
#: How long the gate waits for the newer copy to overtake before it lets the older one go.
OVERTAKE_WAIT = 6.0


def two_chunks() -> tuple[str, list[RowChunkBytes]]:
    """Two chunks, each of 5 rows; the id ``twice`` is in both (older in the first)."""
    rng = np.random.default_rng(3)
    ids = uuid7_strings(9, rng)
    twice = ids[4]
    first, second = ids[:5], [twice, *ids[5:]]
    chunks = []
    for n, chunk_ids in enumerate((first, second)):
        names = [(OLDER if n == 0 else NEWER) if i == twice else f"company {i[-4:]}" for i in chunk_ids]
        vectors = np.full((len(chunk_ids), DIM), 0.5 if n == 0 else 0.25, dtype=np.float32)
        chunks.append(encode_rows(chunk_ids, names, [3] * 5, ["B2"] * 5, ["Python"] * 5, vectors))
    return twice, chunks


def install_gate(dsn: str) -> None:
    """The older copy's insert or update waits for the advisory lock :data:`GATE_KEY`."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION test_gate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"PERFORM pg_advisory_xact_lock({GATE_KEY}); RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER test_gate BEFORE INSERT OR UPDATE ON recruit_metadata FOR EACH ROW "
            f"WHEN (NEW.company_name = '{OLDER}') EXECUTE FUNCTION test_gate()"
        )


@contextlib.contextmanager
def gate_held(dsn: str, twice: str) -> Iterator[dict[str, bool]]:
    """Hold the gate while the body starts the ingest; on exit, wait until the newer copy is
    stored (at most :data:`OVERTAKE_WAIT` s), then open the gate. ``seen["overtook"]``: the newer
    copy committed while the older one was held."""
    seen = {"overtook": False}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (GATE_KEY,))
        yield seen
        deadline = time.monotonic() + OVERTAKE_WAIT
        while time.monotonic() < deadline:
            row = conn.execute("SELECT company_name FROM recruit_metadata WHERE id = %s", (twice,)).fetchone()
            if row == (NEWER,):
                seen["overtook"] = True
                break
            time.sleep(0.05)
        conn.execute("SELECT pg_advisory_unlock(%s)", (GATE_KEY,))


def stored(dsn: str, twice: str) -> tuple[str, float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT m.company_name, (e.vector::real[])[1] FROM recruit_metadata m JOIN recruit_embedding e USING (id) "
            "WHERE id = %s",
            (twice,),
        ).fetchone()
        assert conn.execute("SELECT count(*) FROM recruit_metadata").fetchone() == (9,)
    assert row is not None
    return str(row[0]), float(row[1])
