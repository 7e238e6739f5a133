"""``airflow-embedding``: the AI server and the local tools, as one command with sub-commands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from airflow_embedding_provider.rows import DEFAULT_DIMENSION


def _ai_server(args: argparse.Namespace) -> int:
    from airflow_embedding_provider.ai_server.dataset import load_dataset
    from airflow_embedding_provider.ai_server.service import serve

    dataset = load_dataset(args.pkl)
    serve(dataset, host=args.host, port=args.port)
    return 0


def _api_server(args: argparse.Namespace) -> int:
    from airflow_embedding_provider.api_server.service import CacheServicer, FaultPlan, serve

    faults = FaultPlan(
        fail_first=args.fail_first,
        fail_always=args.fail_always,
        fail_code=args.fail_code,
        delay=args.delay,
        delay_first=args.delay_first,
    )
    serve(CacheServicer(faults=faults, stats_file=args.stats_file), host=args.host, port=args.port)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from airflow_embedding_provider.devkit.sample import write_sample

    path = write_sample(args.out, args.rows, dimension=args.dim, seed=args.seed)
    print(f"wrote {args.rows} rows of dimension {args.dim} to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airflow-embedding", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    ai = sub.add_parser("ai-server", help="serve a .pkl over gRPC (EmbeddingStreamService.GetEmbeddings)")
    ai.add_argument("--pkl", required=True, help="pickled pandas DataFrame in the design's layout")
    ai.add_argument("--host", default="127.0.0.1")
    ai.add_argument("--port", type=int, default=50051)
    ai.set_defaults(func=_ai_server)

    api = sub.add_parser("api-server", help="reference API server: CacheService.InvalidateCache, in-memory cache")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=50052)
    api.add_argument("--stats-file", type=Path, help="JSON counters (calls, successes, ...) rewritten after every call")
    api.add_argument("--fail-first", type=int, default=0, metavar="N", help="fail the first N calls")
    api.add_argument("--fail-always", action="store_true", help="fail every call")
    api.add_argument("--fail-code", default="UNAVAILABLE", help="a gRPC status code name, or SUCCESS_FALSE")
    api.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="wait before answering")
    api.add_argument("--delay-first", type=int, default=0, metavar="N", help="delay only the first N calls")
    api.set_defaults(func=_api_server)

    sample = sub.add_parser("sample", help="write a sample .pkl with UUIDv7 ids and unit-norm vectors")
    sample.add_argument("--rows", type=int, required=True)
    sample.add_argument("--out", required=True)
    sample.add_argument("--dim", type=int, default=DEFAULT_DIMENSION)
    sample.add_argument("--seed", type=int, default=7)
    sample.set_defaults(func=_sample)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from airflow_embedding_provider.ai_server.dataset import DatasetError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (DatasetError, ValueError, OSError) as exc:
        print(f"airflow-embedding {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
