"""DLQ entries against a real PostgreSQL: payload round trip, scoping and settling."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime, timedelta, timezone

import numpy as np
import psycopg
import pytest

from airflow_embedding_provider.storage.dlq import (
    ALL_PENDING,
    DlqScope,
    PayloadError,
    mark_failed,
    mark_resolved,
    payload_to_chunk,
    select_pending,
)
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, apply_schema
from airflow_embedding_provider.storage.writer import ChunkWriter
from airflow_embedding_provider.validation import validate_chunk
from airflow_embedding_provider.wire.codec import WireChunk

DIM = 8
F32 = np.finfo(np.float32)


def _uid(i: int) -> str:
    return str(uuid.UUID(int=(0x019B << 112) | i))


def _tricky(n: int, seed: int = 3) -> np.ndarray:
    """``n`` float32 values including the ones a JSON round trip most easily gets wrong."""
    edge = np.array(
        [F32.max, -F32.max, F32.tiny, F32.smallest_subnormal, -F32.smallest_subnormal, 1 / 3, 0.1, 1e-30, 0.0, 7],
        dtype=np.float32,
    )
    rng = np.random.default_rng(seed)
    return np.concatenate([edge, rng.standard_normal(max(0, n - edge.size), dtype=np.float32)])[:n]


def _chunk(rows: list[tuple[str, np.ndarray | bytes]]) -> WireChunk:
    n = len(rows)
    return WireChunk(
        ids=[r[0] for r in rows],
        company_name=["Łódź Labs", None, "東京ソフトウェア株式会社", "Café"][:n] + ["EPAM"] * max(0, n - 4),
        exp_years=[3, None, 0, 2**31 - 1][:n] + [5] * max(0, n - 4),
        english_level=["upper", "fluent", None, "basic"][:n] + ["pre"] * max(0, n - 4),
        primary_keyword=["Python", "Go", "Rust", None][:n] + ["SQL"] * max(0, n - 4),
        vectors=[r[1] if isinstance(r[1], bytes) else np.asarray(r[1], dtype="<f4").tobytes() for r in rows],
    )


@pytest.fixture
def conn(pg_dsn: str):
    with psycopg.connect(pg_dsn) as c:
        apply_schema(c, DIM)
        yield c


def _dead_letter(conn: psycopg.Connection, chunk: WireChunk) -> None:
    """Dead-letter every row of ``chunk`` the way an ingest does: validate, then write."""
    batch, rejected = validate_chunk(chunk, DIM)
    assert len(batch) == 0 and len(rejected) == len(chunk)
    ChunkWriter(conn, dimension=DIM).write(batch, rejected, origin={"run_id": "r1", "chunk": 0})


def _pending(conn: psycopg.Connection, scope: DlqScope = ALL_PENDING, **kw: object) -> list:
    with conn.transaction(), conn.cursor() as cur:
        return select_pending(cur, DEFAULT_TABLES, scope, lock=False, **kw)  # type: ignore[arg-type]


def test_payload_gives_back_the_received_bytes(conn: psycopg.Connection) -> None:
    nan_row = _tricky(16)
    nan_row[[2, 5, 9]] = [np.nan, np.inf, -np.inf]
    received = _chunk(
        [
            (_uid(1).upper(), _tricky(16)),  # another dimension; the id as the peer spelled it
            (_uid(2), nan_row),  # non-finite values travel as strings
            (_uid(3), bytes(range(7))),  # not whole float32 values: base64
            ("not-a-uuid", _tricky(DIM, seed=4)),
            (_uid(5), b""),
        ]
    )
    _dead_letter(conn, received)
    entries = _pending(conn)
    assert len(entries) == 5
    by_id = {e.payload["id"]: e for e in entries}
    assert by_id[_uid(3)].payload["vector"] == {"base64": base64.b64encode(bytes(range(7))).decode()}
    assert by_id[_uid(2)].payload["vector"][2] == "nan" and by_id[_uid(2)].payload["vector"][9] == "-inf"
    assert by_id["not-a-uuid"].id is None and by_id[_uid(1).upper()].id == _uid(1)

    order = {row_id: i for i, row_id in enumerate(received.ids)}
    entries.sort(key=lambda e: order[e.payload["id"]])
    replayed = payload_to_chunk(e.payload for e in entries)
    assert replayed == received  # every field, every vector byte (NaN is the canonical quiet NaN)


def test_negative_zero_survives_the_payload(conn: psycopg.Connection) -> None:
    received = _chunk([(_uid(1), np.array([-0.0] * 16, dtype=np.float32))])
    _dead_letter(conn, received)
    assert payload_to_chunk(e.payload for e in _pending(conn)) == received


def test_text_with_nul_survives_the_payload(conn: psycopg.Connection) -> None:
    received = _chunk([(_uid(1), _tricky(16))])
    received = WireChunk(
        ids=received.ids,
        company_name=["Null\x00Byte GmbH"],
        exp_years=received.exp_years,
        english_level=["upper\x00"],
        primary_keyword=received.primary_keyword,
        vectors=received.vectors,
    )
    _dead_letter(conn, received)  # JSONB refuses \u0000: the text travels as base64
    entries = _pending(conn)
    assert entries[0].payload["company_name"] == {"base64": base64.b64encode(b"Null\x00Byte GmbH").decode()}
    assert payload_to_chunk(e.payload for e in entries) == received


def test_payload_strings_and_numbers_decode_to_float32() -> None:
    chunk = payload_to_chunk(
        [{"id": "x", "vector": ["-0.0", "inf", "nan", 1, 2.5, 340282346638528860000000000000000000000], "_origin": {}}]
    )
    values = np.frombuffer(chunk.vectors[0], dtype="<f4")
    assert np.signbit(values[0]) and values[0] == 0 and values[1] == np.inf and np.isnan(values[2])
    assert values[3:].tolist() == [1.0, 2.5, float(F32.max)]
    assert chunk.company_name == [None] and chunk.exp_years == [None]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"id": "x", "vector": [1.0, "abc"]}, r"vector\[1\] is 'abc', not a number"),
        ({"id": "x", "vector": [1.0, None]}, r"vector\[1\] is None"),
        ({"id": "x", "vector": [True]}, r"vector\[0\] is True"),
        ({"id": "x", "vector": {"hex": "00"}}, "without a 'base64' string"),
        ({"id": "x", "vector": {"base64": "@@"}}, "not valid base64"),
        ({"id": "x", "vector": "1,2"}, "is a str, expected a list"),
        ({"id": "x", "exp_years": "2y", "vector": []}, "exp_years is '2y'"),
        ({"id": 7, "vector": []}, "id is 7"),
        ({"id": "x", "company_name": 3, "vector": []}, "company_name is 3"),
    ],
)
def test_unreadable_payloads_say_what_is_wrong(payload: dict, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        payload_to_chunk([payload])


def test_scope_by_id_time_and_kind(conn: psycopg.Connection) -> None:
    rows: list[tuple[str, np.ndarray | bytes]] = [(_uid(i), _tricky(16)) for i in range(4)]
    rows += [(_uid(4), np.full(DIM, np.nan, dtype=np.float32)), (_uid(5), b"\x00\x01\x02")]
    for row in rows:  # one at a time: dlq_id order is row order
        _dead_letter(conn, _chunk([row]))
    base = datetime(2025, 12, 11, tzinfo=timezone.utc)
    for i in range(6):
        conn.execute(
            "UPDATE recruit_embedding_dlq SET created_at = %s WHERE payload->>'id' = %s",
            ((base + timedelta(hours=i)).replace(tzinfo=None), _uid(i)),
        )
    conn.commit()

    def ids(scope: DlqScope, **kw: object) -> list[str | None]:
        return [e.id for e in _pending(conn, scope, **kw)]

    assert ids(ALL_PENDING) == [_uid(i) for i in range(6)]
    assert ids(DlqScope(ids=(_uid(4), _uid(1), _uid(99)))) == [_uid(1), _uid(4)]
    assert ids(DlqScope(since=base + timedelta(hours=2))) == [_uid(2), _uid(3), _uid(4), _uid(5)]
    # until is exclusive: consecutive windows never overlap.
    assert ids(DlqScope(since=base + timedelta(hours=1), until=base + timedelta(hours=3))) == [_uid(1), _uid(2)]
    assert ids(DlqScope(error_kinds=("non_finite_vector", "bad_vector_bytes"))) == [_uid(4), _uid(5)]
    assert ids(DlqScope(ids=(_uid(0), _uid(4)), error_kinds=("dimension_mismatch",))) == [_uid(0)]
    # An aware bound in another zone means the same instant.
    kyiv = timezone(timedelta(hours=2))
    assert ids(DlqScope(until=(base + timedelta(hours=1)).astimezone(kyiv))) == [_uid(0)]
    # Paging walks the queue in dlq_id order.
    first = _pending(conn, ALL_PENDING, limit=4)
    assert [e.id for e in first] == [_uid(i) for i in range(4)]
    assert ids(ALL_PENDING, after_dlq_id=first[-1].dlq_id) == [_uid(4), _uid(5)]
    # An id that is not a UUID is refused by PostgreSQL, not silently matched to nothing.
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        ids(DlqScope(ids=("nope",)))


def test_settling_entries(conn: psycopg.Connection) -> None:
    _dead_letter(conn, _chunk([(_uid(i), _tricky(16)) for i in range(4)]))
    e0, e1, e2, e3 = _pending(conn)
    with conn.transaction(), conn.cursor() as cur:
        assert mark_resolved(cur, DEFAULT_TABLES, [e0.dlq_id, e1.dlq_id]) == 2
        mark_failed(cur, DEFAULT_TABLES, [(e2.dlq_id, "non_finite_vector", "vector has non-finite values")])
        assert mark_resolved(cur, DEFAULT_TABLES, [e3.dlq_id], delete=True) == 1
    rows = conn.execute(
        "SELECT id::text, status, attempts, last_attempt_at IS NOT NULL, error_kind, error_message, payload "
        "FROM recruit_embedding_dlq ORDER BY dlq_id"
    ).fetchall()
    assert [r[:5] for r in rows] == [
        (_uid(0), "resolved", 1, True, "dimension_mismatch"),
        (_uid(1), "resolved", 1, True, "dimension_mismatch"),
        (_uid(2), "pending", 1, True, "non_finite_vector"),
    ]
    assert rows[2][5] == "vector has non-finite values"
    assert rows[0][6] == e0.payload  # the payload is never rewritten
    assert [e.id for e in _pending(conn)] == [_uid(2)]

    # Settling again changes nothing: resolved entries are not pending any more.
    before = conn.execute("SELECT * FROM recruit_embedding_dlq ORDER BY dlq_id").fetchall()
    with conn.transaction(), conn.cursor() as cur:
        assert mark_resolved(cur, DEFAULT_TABLES, [e0.dlq_id, e1.dlq_id, e3.dlq_id]) == 0
        mark_failed(cur, DEFAULT_TABLES, [(e0.dlq_id, "x", "y")])
    assert conn.execute("SELECT * FROM recruit_embedding_dlq ORDER BY dlq_id").fetchall() == before


def test_locked_entries_are_skipped_by_a_concurrent_replay(conn: psycopg.Connection, pg_dsn: str) -> None:
    _dead_letter(conn, _chunk([(_uid(i), _tricky(16)) for i in range(3)]))
    with psycopg.connect(pg_dsn) as other, conn.transaction(), conn.cursor() as cur:
        mine = select_pending(cur, DEFAULT_TABLES, limit=2)
        with other.transaction(), other.cursor() as other_cur:
            theirs = select_pending(other_cur, DEFAULT_TABLES)
    assert [e.id for e in mine] == [_uid(0), _uid(1)] and [e.id for e in theirs] == [_uid(2)]
