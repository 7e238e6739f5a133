"""``recruit_embedding_dlq_replay`` run for real: ``airflow dags test``, real PostgreSQL and AI server.

The DLQ entries are produced the way an ingest produces them: a received chunk is validated
against the configured dimension and the writer dead-letters what it rejects.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import numpy as np
import psycopg

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.storage.schema import apply_schema
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.validation import validate_chunk
from airflow_embedding_provider.wire.codec import WireChunk
from dev.stack import dags_test, task_result
from dev.verify import stored_rows, table_digest

DAG_ID = "recruit_embedding_dlq_replay"
F32 = np.finfo(np.float32)


def _uid(i: int) -> str:
    return str(uuid.UUID(int=(0x019B << 112) | (i << 20) | 0x7000_0000_0000))


def _vectors(n: int, dim: int, seed: int = 5) -> list[bytes]:
    """Unit vectors with the values a lossy path gets wrong put in: extremes and subnormals."""
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((n, dim), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    matrix[0, :4] = np.array([F32.max, F32.smallest_subnormal, -F32.tiny, 1 / 3], dtype=np.float32)
    return [row.astype("<f4").tobytes() for row in matrix]


def _chunk(ids: list[str], vectors: list[bytes]) -> WireChunk:
    n = len(ids)
    return WireChunk(
        ids=ids,
        company_name=[["Łódź Labs", "東京ソフトウェア株式会社", None][i % 3] for i in range(n)],
        exp_years=[[0, 7, None, 2**31 - 1][i % 4] for i in range(n)],
        english_level=[["upper", None][i % 2] for i in range(n)],
        primary_keyword=[["Python", "Go", "Rust"][i % 3] for i in range(n)],
        vectors=vectors,
    )


def _asset_events(airflow_home: Path) -> list[dict[str, object]]:
    """The extras of the Asset events this DAG emitted, oldest first, as Airflow recorded them."""
    with sqlite3.connect(airflow_home / "airflow.db") as db:
        rows = db.execute(
            "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
            "WHERE e.source_dag_id = ? AND a.name = 'recruit_embedding' ORDER BY e.id",
            (DAG_ID,),
        ).fetchall()
    return [json.loads(r[0]) if isinstance(r[0], str) else r[0] for r in rows]


def _ingest_rejects(dsn: str, chunk: WireChunk, dimension: int) -> None:
    """An ingest configured with ``dimension`` receives ``chunk`` and dead-letters all of it."""
    batch, rejected = validate_chunk(chunk, dimension)
    assert len(batch) == 0 and len(rejected) == len(chunk)
    with psycopg.connect(dsn) as conn:
        apply_schema(conn, dimension)
        ChunkWriter(conn, dimension=dimension).write(batch, rejected, origin={"dag_id": "recruit_embedding_ingest"})


def _migrate(dsn: str) -> None:
    """The operator's fix for a model change: the (empty) tables go, to be re-created at the new
    dimension; the DLQ stays."""
    with psycopg.connect(dsn) as conn:
        conn.execute("DROP TABLE recruit_embedding, recruit_metadata")


def _dlq(dsn: str) -> dict[str, tuple[str, int, str, str]]:
    """payload id -> (status, attempts, error_kind, error_message); asserts one entry a row."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT payload->>'id', status, attempts, error_kind, error_message FROM recruit_embedding_dlq"
        ).fetchall()
    entries = {r[0]: (r[1], r[2], r[3], r[4]) for r in rows}
    assert len(entries) == len(rows), "a row has more than one DLQ entry"
    return entries


def _env(dag_env: dict[str, str], dimension: int) -> dict[str, str]:
    return {**dag_env, "RECRUIT_EMBEDDING_DIMENSION": str(dimension)}


def test_rows_rejected_for_dimension_are_stored_after_the_fix(
    dag_env: dict[str, str], airflow_home: Path, pg_dsn: str
) -> None:
    ids = [_uid(i) for i in range(25)]
    received = _chunk(ids, _vectors(len(ids), 16))
    _ingest_rejects(pg_dsn, received, 8)  # the model now sends 16 values; the config says 8
    assert {v[:3] for v in _dlq(pg_dsn).values()} == {("pending", 0, "dimension_mismatch")}

    # The configuration says 16 but the tables were not migrated: the run stops, nothing changes.
    failed = dags_test(DAG_ID, _env(dag_env, 16), check=False)
    assert failed.returncode != 0
    assert "stores vector(8) but the configured dimension is 16" in failed.stdout + failed.stderr
    assert {v[:2] for v in _dlq(pg_dsn).values()} == {("pending", 0)}

    events_before = _asset_events(airflow_home)
    _migrate(pg_dsn)
    dags_test(DAG_ID, _env(dag_env, 16), conf={"error_kinds": ["dimension_mismatch"]})
    result = task_result(airflow_home, DAG_ID, "replay")
    # The replay stored rows: one event of the embedding table's Asset, for downstream DAGs.
    assert _asset_events(airflow_home) == [*events_before, {"rows_changed": 25, "checkpoint": None}]
    assert result == {
        "selected": 25,
        "resolved": 25,
        "superseded": 0,
        "still_failing": 0,
        "refetched": 0,
        "inserted": 25,
        "updated": 0,
        "unchanged": 0,
        "by_reason": {},
        "resolved_by_reason": {"dimension_mismatch": 25},
    }
    # In the tables, bit-exact: every metadata field and every vector byte as received.
    with psycopg.connect(pg_dsn) as conn:
        stored = stored_rows(conn)
        assert stored == {
            row_id: (
                (
                    received.company_name[i],
                    received.exp_years[i],
                    received.english_level[i],
                    received.primary_keyword[i],
                ),
                received.vectors[i],
            )
            for i, row_id in enumerate(ids)
        }
        outbox = conn.execute("SELECT target, source FROM embedding_cache_outbox").fetchall()
        assert len(outbox) == 1 and outbox[0][0] == "recruit"
        assert outbox[0][1].startswith(f"{DAG_ID}/") and outbox[0][1].endswith("/replay")
        digest = table_digest(conn)
        dlq_before = conn.execute("SELECT * FROM recruit_embedding_dlq ORDER BY dlq_id").fetchall()
    # Their entries are resolved, kept once each; none is pending.
    assert {v[:3] for v in _dlq(pg_dsn).values()} == {("resolved", 1, "dimension_mismatch")}
    assert set(_dlq(pg_dsn)) == set(ids)

    # Replaying again changes nothing: the resolved entries are not pending any more.
    dags_test(DAG_ID, _env(dag_env, 16))
    again = task_result(airflow_home, DAG_ID, "replay")
    assert (again["selected"], again["resolved"], again["still_failing"]) == (0, 0, 0)
    assert len(_asset_events(airflow_home)) == len(events_before) + 1  # nothing stored: no event
    with psycopg.connect(pg_dsn) as conn:
        assert table_digest(conn) == digest
        assert conn.execute("SELECT * FROM recruit_embedding_dlq ORDER BY dlq_id").fetchall() == dlq_before
        assert conn.execute("SELECT count(*) FROM embedding_cache_outbox").fetchone() == (1,)


def test_rows_that_still_fail_stay_pending_with_the_latest_error(
    dag_env: dict[str, str], airflow_home: Path, pg_dsn: str
) -> None:
    good = [_uid(i) for i in range(5)]
    nan = [_uid(i) for i in range(5, 8)]
    vectors = _vectors(8, 16)
    for i in range(5, 8):
        broken = np.frombuffer(vectors[i], dtype="<f4").copy()
        broken[i] = np.nan
        vectors[i] = broken.tobytes()
    odd = _uid(9)
    _ingest_rejects(pg_dsn, _chunk([*good, *nan, odd], [*vectors, b"\x00" * 63]), 8)
    _migrate(pg_dsn)
    env = _env(dag_env, 16)

    refused = dags_test(DAG_ID, env, conf={"ids": ["yesterday"]}, check=False)
    assert refused.returncode != 0 and "is not a 'uuid'" in refused.stdout + refused.stderr

    # Scoped by id: only those two entries are tried.
    dags_test(DAG_ID, env, conf={"ids": [good[0], nan[0].upper()]})
    scoped = task_result(airflow_home, DAG_ID, "replay")
    assert (scoped["selected"], scoped["resolved"], scoped["still_failing"]) == (2, 1, 1)
    assert scoped["by_reason"] == {"non_finite_vector": 1}
    dlq = _dlq(pg_dsn)
    assert dlq[good[0]][:2] == ("resolved", 1) and dlq[nan[0]][:3] == ("pending", 1, "non_finite_vector")
    assert "non-finite" in dlq[nan[0]][3] and "replayed from the stored payload" in dlq[nan[0]][3]
    assert all(dlq[i][:2] == ("pending", 0) for i in [*good[1:], *nan[1:], odd])

    # Everything pending: the rest of the good rows are stored; the bad ones are tried once more.
    dags_test(DAG_ID, env)
    rest = task_result(airflow_home, DAG_ID, "replay")
    assert (rest["selected"], rest["resolved"], rest["still_failing"]) == (8, 4, 4)
    assert rest["by_reason"] == {"non_finite_vector": 3, "bad_vector_bytes": 1}
    dlq = _dlq(pg_dsn)
    assert len(dlq) == 9  # no second entry for any replayed row
    assert {i: dlq[i][:3] for i in [*nan, odd]} == {
        nan[0]: ("pending", 2, "non_finite_vector"),
        nan[1]: ("pending", 1, "non_finite_vector"),
        nan[2]: ("pending", 1, "non_finite_vector"),
        odd: ("pending", 1, "bad_vector_bytes"),
    }
    assert all(dlq[i][:2] == ("resolved", 1) for i in good)
    with psycopg.connect(pg_dsn) as conn:
        assert sorted(stored_rows(conn)) == good


def test_refetch_replays_the_ai_servers_version(
    dag_env: dict[str, str], airflow_home: Path, pg_dsn: str, sample_dataset: EmbeddingDataset
) -> None:
    index = 42
    dim = sample_dataset.dimension
    known = sample_dataset.ids[index]
    unknown = _uid(1)  # not on the server: its stored payload is replayed
    assert unknown not in sample_dataset.ids
    broken = np.full(dim, np.nan, dtype="<f4").tobytes()
    received = WireChunk(
        [known, unknown], ["Stale Co", "Kept Co"], [1, 2], ["basic", "fluent"], ["COBOL", "Go"], [broken, broken]
    )
    _ingest_rejects(pg_dsn, received, dim)
    # The unknown row's payload was fixed by hand; the known one is fixed on the AI server only.
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(
            "UPDATE recruit_embedding_dlq SET payload = jsonb_set(payload, '{vector}', to_jsonb(%s::float8[])) "
            "WHERE id = %s",
            (np.frombuffer(_vectors(1, dim)[0], dtype="<f4").astype(float).tolist(), unknown),
        )
    env = _env(dag_env, dim)

    dags_test(DAG_ID, env, conf={"ids": [known]})
    plain = task_result(airflow_home, DAG_ID, "replay")
    assert (plain["selected"], plain["resolved"], plain["refetched"]) == (1, 0, 0)

    dags_test(DAG_ID, env, conf={"refetch": True})
    result = task_result(airflow_home, DAG_ID, "replay")
    assert (result["selected"], result["resolved"], result["refetched"], result["still_failing"]) == (2, 2, 1, 0)
    with psycopg.connect(pg_dsn) as conn:
        stored = stored_rows(conn)
    assert stored[known] == (
        (
            sample_dataset.company_name[index],
            sample_dataset.exp_years[index],
            sample_dataset.english_level[index],
            sample_dataset.primary_keyword[index],
        ),
        sample_dataset.vectors[index].astype("<f4").tobytes(),
    )
    assert stored[unknown] == (("Kept Co", 2, "fluent", "Go"), _vectors(1, dim)[0])
    dlq = _dlq(pg_dsn)
    assert dlq[known][:2] == ("resolved", 2) and dlq[unknown][:2] == ("resolved", 1)
