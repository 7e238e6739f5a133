"""The committed generated code must be what ``make proto`` makes from ``proto/`` now."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
GENERATED = ROOT / "airflow_embedding_provider" / "wire"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = tmp_path / "airflow_embedding_provider" / "wire"
    names = sorted(p.name for p in fresh.iterdir())
    assert names, "protoc generated nothing"
    stale = [n for n in names if (fresh / n).read_bytes() != (GENERATED / n).read_bytes()]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_seed_field_numbers_and_types_are_unchanged() -> None:
    from google.protobuf.descriptor import FieldDescriptor as F

    from airflow_embedding_provider.wire import embedding_pb2

    row = embedding_pb2.RecruitRow.DESCRIPTOR
    expected = {
        "id": (1, F.TYPE_STRING),
        "company_name": (2, F.TYPE_STRING),
        "exp_years": (3, F.TYPE_INT32),
        "english_level": (4, F.TYPE_STRING),
        "primary_keyword": (5, F.TYPE_STRING),
        "vector": (6, F.TYPE_FLOAT),
    }
    # The seed's fields keep their numbers and types; added ones only take new numbers.
    added = {"defects": (7, F.TYPE_MESSAGE), "held_vector": (8, F.TYPE_FLOAT)}
    assert {f.name: (f.number, f.type) for f in row.fields} == expected | added
    assert row.fields_by_name["vector"].is_packed and row.fields_by_name["held_vector"].is_packed
    req = embedding_pb2.StreamEmbeddingRequest.DESCRIPTOR
    # The seed's two fields, plus ones added later under new numbers.
    assert {f.name: f.number for f in req.fields} == {
        "last_processed_uuid": 1,
        "chunk_size": 2,
        "until_uuid": 3,
        "only_ids": 5,
    }
    service = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingStreamService"]
    assert {m.name: (m.client_streaming, m.server_streaming) for m in service.methods} == {
        "GetEmbeddings": (False, True),
        "UploadEmbeddings": (True, False),
        "PlanPartitions": (False, False),
        "ReportRejects": (False, False),
        "GetServerStatus": (False, False),
        "RangeDigests": (False, False),
        "ListRangeDigests": (False, True),
    }
    cache = embedding_pb2.DESCRIPTOR.services_by_name["CacheService"]
    assert [m.name for m in cache.methods] == ["InvalidateCache"]
