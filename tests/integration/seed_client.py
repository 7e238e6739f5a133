"""A client built from the design's proto text alone (``repeated float``, no bytes view, no
``optional``), compiled at run time in its own process: proof that a client that knows nothing of
our Python fast path reads and writes the same data.

Run as ``python seed_client.py get TARGET [AFTER] [CHUNK]``: prints one JSON line a row, the vector
as the hex of its little-endian float32 values, decoded the ordinary way (``list(row.vector)``).

Run as ``python seed_client.py upload TARGET PKL [CHUNK]``: reads the ``.pkl`` with pandas, sends its
rows with ``UploadEmbeddings`` built the ordinary way (``vector=[floats]``), prints the
``UploadResult`` as one JSON line.
"""

from __future__ import annotations

import importlib
import json
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

SEED_PROTO = """
syntax = "proto3";
package recruit.embedding.v1;
service EmbeddingStreamService {
  rpc GetEmbeddings(StreamEmbeddingRequest) returns (stream RowChunk);
  rpc UploadEmbeddings(stream RowChunk) returns (UploadResult);
}
message StreamEmbeddingRequest { string last_processed_uuid = 1; int32 chunk_size = 2; }
message UploadResult { bool success = 1; int32 total_rows = 2; string message = 3; }
message RowChunk { repeated RecruitRow rows = 1; }
message RecruitRow {
  string id = 1;
  string company_name = 2;
  int32 exp_years = 3;
  string english_level = 4;
  string primary_keyword = 5;
  repeated float vector = 6;
}
message CacheInvalidateRequest { string target = 1; }
message CacheInvalidateResponse { bool success = 1; }
service CacheService { rpc InvalidateCache(CacheInvalidateRequest) returns (CacheInvalidateResponse); }
"""


def compile_seed(folder: Path) -> tuple[ModuleType, ModuleType]:
    from grpc_tools import protoc

    (folder / "seed.proto").write_text(SEED_PROTO)
    include = Path(protoc.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{folder}",
            f"-I{include}",
            f"--python_out={folder}",
            f"--grpc_python_out={folder}",
            str(folder / "seed.proto"),
        ]
    )
    if code != 0:
        raise SystemExit("protoc failed on the seed's proto text")
    sys.path.insert(0, str(folder))
    return importlib.import_module("seed_pb2"), importlib.import_module("seed_pb2_grpc")


def main(argv: list[str]) -> int:
    import grpc

    mode, target = argv[0], argv[1]
    pb2, pb2_grpc = compile_seed(Path(tempfile.mkdtemp(prefix="seed-client-")))
    with grpc.insecure_channel(target) as channel:
        if mode == "get":
            after = argv[2] if len(argv) > 2 else ""
            chunk = int(argv[3]) if len(argv) > 3 else 0
            stub = pb2_grpc.EmbeddingStreamServiceStub(channel)
            for message in stub.GetEmbeddings(pb2.StreamEmbeddingRequest(last_processed_uuid=after, chunk_size=chunk)):
                for row in message.rows:
                    floats = list(row.vector)
                    print(
                        json.dumps(
                            {
                                "id": row.id,
                                "company_name": row.company_name,
                                "exp_years": row.exp_years,
                                "english_level": row.english_level,
                                "primary_keyword": row.primary_keyword,
                                "vector": struct.pack(f"<{len(floats)}f", *floats).hex(),
                                "rows_in_message": len(message.rows),
                            }
                        )
                    )
            return 0
        if mode == "upload":
            result = upload(
                pb2, pb2_grpc.EmbeddingStreamServiceStub(channel), argv[2], int(argv[3]) if len(argv) > 3 else 300
            )
            print(json.dumps({"success": result.success, "total_rows": result.total_rows, "message": result.message}))
            return 0
    raise SystemExit(f"unknown mode {mode}")


def upload(pb2: ModuleType, stub: Any, pkl: str, chunk: int) -> Any:
    import re

    import pandas as pd

    # The design's six columns by name (a real file has more); years as "3", "3y" or "no_exp" (0).
    frame = pd.read_pickle(pkl)[
        ["id", "Company Name", "Exp Years", "English Level", "Primary Keyword", "job_post_vectors"]
    ]

    def years_of(value: Any) -> int:
        match = re.match(r"\d+", str(value))
        return int(match.group()) if match else 0

    def chunks() -> Iterator[Any]:
        rows = []
        for rec in frame.itertuples(index=False, name=None):
            row_id, company, years, english, keyword, vector = rec
            rows.append(
                pb2.RecruitRow(
                    id=str(row_id),
                    company_name=str(company),
                    exp_years=years_of(years),
                    english_level=str(english),
                    primary_keyword=str(keyword),
                    vector=[float(x) for x in vector],
                )
            )
            if len(rows) == chunk:
                yield pb2.RowChunk(rows=rows)
                rows = []
        if rows:
            yield pb2.RowChunk(rows=rows)

    return stub.UploadEmbeddings(chunks(), timeout=300)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
