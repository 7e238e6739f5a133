"""The ingest path (validate -> split -> upsert -> progress) with parallel writers, real PostgreSQL."""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
import pytest

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset
from airflow_embedding_provider.digest import row_hashes
from airflow_embedding_provider.partitions import Partition
from airflow_embedding_provider.pipeline import ingest_chunks
from airflow_embedding_provider.storage.checkpoint import (
    PartitionKey,
    low_watermark,
    read_checkpoint,
    resume_point,
    save_plan,
)
from airflow_embedding_provider.storage.schema import DEFAULT_TABLES, apply_schema
from airflow_embedding_provider.storage.writer import ChunkWriter, WriteResult
from airflow_embedding_provider.wire.codec import WireChunk, parse_chunk
from dev.verify import compare

RUN = "run-1"


def chunks_of(data: EmbeddingDataset, start: int, stop: int, size: int) -> Iterator[WireChunk]:
    for offset in range(start, stop, size):
        yield parse_chunk(data.chunk(offset, min(offset + size, stop)).SerializeToString())


@pytest.fixture
def conns(pg_dsn: str) -> Iterator[list[psycopg.Connection]]:
    opened = [psycopg.connect(pg_dsn, autocommit=True) for _ in range(3)]
    apply_schema(opened[0], 384)
    yield opened
    for conn in opened:
        conn.close()


def _ingest_failure(seconds: float, hang: str, *args: Any, **kwargs: Any) -> BaseException:
    """What ``ingest_chunks(*args, **kwargs)`` raised, run on a thread of its own so that a hang
    fails the test (``hang`` says how) instead of stopping the suite."""
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            ingest_chunks(*args, **kwargs)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), hang
    assert len(outcome) == 1, outcome
    return outcome[0]


def _plan(conn: psycopg.Connection, data: EmbeddingDataset, cuts: list[int]) -> list[Partition]:
    bounds = [0, *cuts, len(data)]
    parts = [
        Partition(i, data.ids[a - 1] if a else None, data.ids[b - 1], b - a)
        for i, (a, b) in enumerate(itertools.pairwise(bounds))
    ]
    return save_plan(conn, DEFAULT_TABLES, "recruit", RUN, parts)


def test_parallel_sub_batches_store_everything_and_settle_the_watermark(
    conns: list[psycopg.Connection], sample_dataset: EmbeddingDataset
) -> None:
    data = sample_dataset
    parts = _plan(conns[0], data, [1000, 2000])
    writers = [ChunkWriter(c, dimension=384) for c in conns]
    # Partition 1 first: the checkpoint may not move past partition 0, which is not done.
    key1 = PartitionKey("recruit", RUN, 1)
    stats = ingest_chunks(chunks_of(data, 1000, 2000, 300), writers, dimension=384, sub_batch_size=70, partition=key1)
    assert (stats.rows_received, stats.inserted, stats.sub_batches) == (1000, 1000, 5 * 3 + 2)
    assert stats.last_processed_uuid == data.ids[1999]
    assert read_checkpoint(conns[0]) is None
    for index, (a, b) in ((0, (0, 1000)), (2, (2000, 3000))):
        ingest_chunks(
            chunks_of(data, a, b, 300),
            writers,
            dimension=384,
            sub_batch_size=70,
            partition=PartitionKey("recruit", RUN, index),
        )
    assert read_checkpoint(conns[0]) == data.ids[-1] == parts[-1].until_uuid
    check = compare(conns[0], data)
    assert check.equal, check.summary()


def test_watermark_stops_at_the_first_unfinished_partition(
    conns: list[psycopg.Connection], sample_dataset: EmbeddingDataset
) -> None:
    data = sample_dataset
    _plan(conns[0], data, [1000, 2000])
    writer = ChunkWriter(conns[0], dimension=384)

    def run(index: int, a: int, b: int, fail_at: int | None = None) -> None:
        def chunks() -> Iterator[WireChunk]:
            for n, chunk in enumerate(chunks_of(data, a, b, 200)):
                if n == fail_at:
                    raise ConnectionError("task died")
                yield chunk

        with contextlib.suppress(ConnectionError):
            ingest_chunks(
                chunks(), [writer], dimension=384, sub_batch_size=200, partition=PartitionKey("recruit", RUN, index)
            )

    def watermark() -> str | None:
        with conns[0].cursor() as cur:
            return low_watermark(cur, DEFAULT_TABLES, "recruit", RUN)

    run(2, 2000, 3000)
    run(1, 1000, 2000, fail_at=3)  # committed up to ids[1599]
    assert watermark() is None  # partition 0 has nothing yet
    run(0, 0, 1000)
    assert watermark() == data.ids[1599]
    run(1, 1600, 2000)
    assert watermark() == data.ids[-1]


def test_a_retry_resumes_inside_its_range(conns: list[psycopg.Connection], sample_dataset: EmbeddingDataset) -> None:
    data = sample_dataset
    parts = _plan(conns[0], data, [1500])
    key = PartitionKey("recruit", RUN, 0)
    writer = ChunkWriter(conns[0], dimension=384)

    def dies_after(limit: int) -> Iterator[WireChunk]:
        for n, chunk in enumerate(chunks_of(data, 0, 1500, 300)):
            if n == limit:
                raise ConnectionError("stream gone")
            yield chunk

    with pytest.raises(ConnectionError):
        ingest_chunks(dies_after(3), [writer], dimension=384, sub_batch_size=300, partition=key)
    after, committed, done = resume_point(conns[0], DEFAULT_TABLES, key, parts[0])
    assert (after, committed, done) == (data.ids[899], data.ids[899], False)
    with conns[0].cursor() as cur:
        assert low_watermark(cur, DEFAULT_TABLES, "recruit", RUN) == data.ids[899]
    assert read_checkpoint(conns[0]) == data.ids[899]
    rest = ingest_chunks(chunks_of(data, 900, 1500, 300), [writer], dimension=384, sub_batch_size=300, partition=key)
    assert rest.rows_received == 600 and rest.inserted == 600
    assert resume_point(conns[0], DEFAULT_TABLES, key, parts[0])[2] is True
    assert read_checkpoint(conns[0]) == data.ids[1499]


def test_a_plan_is_stored_once_per_run(conns: list[psycopg.Connection], sample_dataset: EmbeddingDataset) -> None:
    first = _plan(conns[0], sample_dataset, [1000])
    again = save_plan(conns[0], DEFAULT_TABLES, "recruit", RUN, [Partition(0, None, sample_dataset.ids[5], 6)])
    assert again == first


def test_a_sub_batch_size_below_one_is_refused_instead_of_looping(
    conns: list[psycopg.Connection], sample_dataset: EmbeddingDataset
) -> None:
    failure = _ingest_failure(
        20,
        "ingest_chunks loops for ever on sub_batch_size 0",
        chunks_of(sample_dataset, 0, 300, 300),
        [ChunkWriter(conns[0], dimension=384)],
        dimension=384,
        sub_batch_size=0,
    )
    assert isinstance(failure, ValueError), failure
    assert str(failure) == "sub_batch_size must be at least 1, got 0"


def test_the_stored_row_hashes_are_those_of_the_stored_rows(
    conns: list[psycopg.Connection], sample_dataset: EmbeddingDataset
) -> None:
    # Every message carries the AI server's row hashes, and sub-batches of 70 cut each 300-row
    # chunk unevenly: a hash that landed on the wrong row would differ from the row's own here.
    data = sample_dataset
    writers = [ChunkWriter(c, dimension=384) for c in conns]
    ingest_chunks(chunks_of(data, 0, len(data), 300), writers, dimension=384, sub_batch_size=70)
    rows = (
        conns[0]
        .execute(
            "SELECT m.id::text, m.company_name, m.exp_years, m.english_level, m.primary_keyword, m.row_hash, "
            "e.vector::text FROM recruit_metadata m JOIN recruit_embedding e USING (id) ORDER BY m.id"
        )
        .fetchall()
    )
    assert len(rows) == len(data)
    vectors = np.array([np.array(json.loads(r[6]), dtype=np.float32) for r in rows], dtype=np.float32)
    company, years, english, keyword = ([r[k] for r in rows] for k in range(1, 5))
    mine = row_hashes([r[0] for r in rows], company, years, english, keyword, vectors)
    assert [r[5] for r in rows] == mine.tolist()
    assert mine.tolist() == data.row_hashes.tolist()  # ids unique and in order: the dataset's own order


class _CountingWriter(ChunkWriter):
    """A real writer that records how many writes of its group run at once; each write holds on
    a little so that writes allowed to overlap do overlap."""

    def __init__(self, conn: psycopg.Connection, group: dict[str, int], lock: threading.Lock) -> None:
        super().__init__(conn, dimension=384)
        self._group, self._lock = group, lock

    def write(self, *args: object, **kwargs: object) -> WriteResult:
        with self._lock:
            self._group["now"] += 1
            self._group["most"] = max(self._group["most"], self._group["now"])
        try:
            time.sleep(0.05)
            return super().write(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            with self._lock:
                self._group["now"] -= 1


@pytest.mark.parametrize(("share", "most"), [(None, 3), (1, 1), (2, 2)])
def test_the_writer_share_caps_the_writes_at_once_and_everything_is_stored(
    conns: list[psycopg.Connection], sample_dataset: EmbeddingDataset, share: int | None, most: int
) -> None:
    group, lock = {"now": 0, "most": 0}, threading.Lock()
    writers = [_CountingWriter(c, group, lock) for c in conns]
    stats = ingest_chunks(
        chunks_of(sample_dataset, 0, 1500, 300),
        writers,
        dimension=384,
        sub_batch_size=50,
        writer_share=None if share is None else (lambda: share),
    )
    assert stats.inserted == 1500
    assert group["most"] == most
    check = compare(conns[0], sample_dataset, ignore=sample_dataset.ids[1500:])
    assert check.equal, check.summary()


def test_a_share_that_changes_between_chunks_takes_effect(
    conns: list[psycopg.Connection], sample_dataset: EmbeddingDataset
) -> None:
    # One writer while a neighbour task runs (the first two chunks), all three once it has finished.
    group, lock = {"now": 0, "most": 0}, threading.Lock()
    writers = [_CountingWriter(c, group, lock) for c in conns]
    asked = itertools.count()
    seen: list[int] = []

    def share() -> int:
        if next(asked) < 2:
            return 1
        if not seen:
            seen.append(group["most"])  # the most writes at once while the share was 1
        return 3

    stats = ingest_chunks(
        chunks_of(sample_dataset, 0, 1500, 300), writers, dimension=384, sub_batch_size=50, writer_share=share
    )
    assert stats.inserted == 1500
    assert seen == [1] and group["most"] == 3


def test_a_writer_that_fails_stops_the_writes_waiting_at_the_gate_and_a_rerun_completes(
    pg_dsn: str, conns: list[psycopg.Connection], sample_dataset: EmbeddingDataset
) -> None:
    # A share of 1 of 3 writers: the other sub-batches wait at the gate. The server ends the second
    # writer's session (a real fault, pg_terminate_backend), so the second write fails. The ingest
    # must fail with that error, not hang, and the writes still waiting must give up rather than run.
    data = sample_dataset
    group, lock = {"now": 0, "most": 0, "started": 0, "failed": 0, "after": 0}, threading.Lock()

    class Starting(_CountingWriter):
        def write(self, *args: object, **kwargs: object) -> WriteResult:
            with lock:
                group["started"] += 1
                group["after"] += group["failed"]
            try:
                return super().write(*args, **kwargs)
            except Exception:
                with lock:
                    group["failed"] = 1
                raise

    writers = [Starting(c, group, lock) for c in conns]
    # With a timeout, pg_terminate_backend returns once the session has ended.
    assert conns[0].execute("SELECT pg_terminate_backend(%s, 10000)", [conns[1].info.backend_pid]).fetchone() == (True,)
    failure = _ingest_failure(
        60,
        "the ingest hangs after a writer failed with writes waiting at the gate",
        chunks_of(data, 0, 1500, 300),
        writers,
        dimension=384,
        sub_batch_size=50,
        writer_share=lambda: 1,
    )
    assert isinstance(failure, psycopg.OperationalError), failure
    assert group["most"] == 1 and group["failed"] == 1
    # The gate frees on the failure, and one waiting write may take it before the ingest closes it
    # (that write then holds it for its 50 ms); every other waiting write gives up without writing.
    assert group["after"] <= 1 and group["started"] < 30, group
    stored = {r[0] for r in conns[0].execute("SELECT id::text FROM recruit_metadata").fetchall()}
    assert len(stored) < 1500
    # Nothing lost: every row up to the checkpoint is stored, and a run from it completes the tables.
    position = read_checkpoint(conns[0])
    covered = [i for i in data.ids[:1500] if position is not None and i <= position]
    assert set(covered) <= stored
    with psycopg.connect(pg_dsn, autocommit=True) as fresh:
        start = len(covered)
        rest = ingest_chunks(
            chunks_of(data, start, 1500, 300),
            [ChunkWriter(conns[0], dimension=384), ChunkWriter(fresh, dimension=384)],
            dimension=384,
            sub_batch_size=50,
        )
    assert rest.rows_received == 1500 - start
    assert read_checkpoint(conns[0]) == data.ids[1499]
    check = compare(conns[0], data, ignore=data.ids[1500:])
    assert check.equal, check.summary()
