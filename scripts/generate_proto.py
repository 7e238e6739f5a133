"""Generate the Python gRPC code for proto/*.proto into airflow_embedding_provider/wire/.

``make proto`` runs it; ``tests/unit/wire/test_generated_code.py`` runs it into a scratch folder
and fails when the committed files differ (stale). The ``-I<package path>=proto`` mapping makes
protoc emit absolute imports (``from airflow_embedding_provider.wire import ...``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
PACKAGE_PATH = "airflow_embedding_provider/wire"
GENERATED = (
    "embedding_pb2.py",
    "embedding_pb2.pyi",
    "embedding_pb2_grpc.py",
    "embedding_bytes_view_pb2.py",
    "embedding_bytes_view_pb2.pyi",
)


def generate(out_root: Path) -> list[Path]:
    """Run protoc; the generated files land in ``out_root/airflow_embedding_provider/wire``."""
    (out_root / PACKAGE_PATH).mkdir(parents=True, exist_ok=True)
    protos = sorted(PROTO_DIR.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PACKAGE_PATH}={PROTO_DIR}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[f"{PACKAGE_PATH}/{p.name}" for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc emits a services module for every file; the bytes view has none.
    empty = out_root / PACKAGE_PATH / "embedding_bytes_view_pb2_grpc.py"
    empty.unlink(missing_ok=True)
    return [out_root / PACKAGE_PATH / name for name in GENERATED]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write the package path under")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))


if __name__ == "__main__":
    main()
