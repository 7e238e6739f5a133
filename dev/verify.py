"""Compare what the tables hold with the source dataset: every id, field and vector bit."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from airflow_embedding_provider.ai_server.dataset import EmbeddingDataset


@dataclass
class Comparison:
    expected: int
    stored: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not (self.missing or self.unexpected or self.differing)

    def summary(self) -> str:
        if self.equal:
            return f"tables equal the source: {self.stored} rows, every field and vector bit-exact"
        return (
            f"tables differ from the source: {len(self.missing)} missing, {len(self.unexpected)} unexpected, "
            f"{len(self.differing)} differing (e.g. {(self.missing + self.unexpected + self.differing)[:3]})"
        )


def stored_rows(conn: psycopg.Connection) -> dict[str, tuple[tuple[object, ...], bytes]]:
    """id -> (metadata tuple, vector as float32 bytes) for every stored row (metadata joined)."""
    register_vector(conn)
    rows = conn.execute(
        "SELECT m.id::text, m.company_name, m.exp_years, m.english_level, m.primary_keyword, e.vector "
        "FROM recruit_metadata m LEFT JOIN recruit_embedding e USING (id)"
    ).fetchall()
    return {
        r[0]: ((r[1], r[2], r[3], r[4]), b"" if r[5] is None else np.asarray(r[5].to_numpy(), dtype="<f4").tobytes())
        for r in rows
    }


def compare(conn: psycopg.Connection, dataset: EmbeddingDataset, *, ignore: Iterable[str] = ()) -> Comparison:
    """Stored rows against every valid-dimension row of ``dataset``; ids in ``ignore`` are skipped
    (rows the test expects in the DLQ instead). The last occurrence of a repeated id wins."""
    skip = set(ignore)
    expected: dict[str, tuple[tuple[object, ...], bytes]] = {}
    for i, row_id in enumerate(dataset.ids):
        if row_id in skip or i < dataset.invalid_prefix or i in dataset.odd_vectors or i in dataset.defects:
            continue
        expected[row_id] = (
            (dataset.company_name[i], dataset.exp_years[i], dataset.english_level[i], dataset.primary_keyword[i]),
            dataset.vectors[i].astype("<f4").tobytes(),
        )
    stored = stored_rows(conn)
    result = Comparison(expected=len(expected), stored=len(stored))
    result.missing = sorted(set(expected) - set(stored))
    result.unexpected = sorted(set(stored) - set(expected))
    result.differing = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    return result


def table_digest(conn: psycopg.Connection) -> tuple[int, str]:
    """Row count and a hash over every stored row, in id order: equal digests = equal tables."""
    digest = hashlib.sha256()
    rows = stored_rows(conn)
    for key in sorted(rows):
        digest.update(repr((key, rows[key])).encode())
    return len(rows), digest.hexdigest()
