"""``python -m dev``: the dev tools' commands, kept out of the production ``airflow-embedding``.

* ``sample``: write a sample ``.pkl`` (or Parquet file) in the real dataset's layout.
* ``api-server``: the reference API server (``CacheService`` over an in-memory cache), a stand-in
  for the real API server, with the fault injection the tests and the demo use.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from airflow_embedding_provider.rows import DEFAULT_DIMENSION
from airflow_embedding_provider.security import ServerSecurity, add_cli_options
from airflow_embedding_provider.wire.contract import API_SERVER_PORT

#: The sub-commands served here (every other one is ``airflow-embedding``'s).
COMMANDS = ("api-server", "sample")


def _api_server(args: argparse.Namespace) -> int:
    from dev.api_server.service import CacheServicer, FaultPlan, serve

    security = ServerSecurity.from_args(args)
    security.check_exposure(args.host)
    faults = FaultPlan(
        fail_first=args.fail_first,
        fail_always=args.fail_always,
        fail_code=args.fail_code,
        delay=args.delay,
        delay_first=args.delay_first,
    )
    serve(
        CacheServicer(faults=faults, stats_file=args.stats_file),
        host=args.host,
        port=args.port,
        security=security,
    )
    return 0


def _sample(args: argparse.Namespace) -> int:
    from dev.sample import write_sample

    path = write_sample(
        args.out,
        args.rows,
        dimension=args.dim,
        seed=args.seed,
        layout=args.layout,
        ids=args.ids,
        odd_cell=not args.no_odd_cell,
        clusters=args.clusters,
    )
    odd = "" if args.no_odd_cell else ", one odd 'Exp Years' cell that goes to the DLQ"
    print(f"wrote {args.rows} rows of dimension {args.dim} ({args.layout} layout{odd}) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dev", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api-server", help="reference API server: CacheService.InvalidateCache, in-memory cache")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=API_SERVER_PORT)
    api.add_argument("--stats-file", type=Path, help="JSON counters (calls, successes, ...) rewritten after every call")
    api.add_argument("--fail-first", type=int, default=0, metavar="N", help="fail the first N calls")
    api.add_argument("--fail-always", action="store_true", help="fail every call")
    api.add_argument("--fail-code", default="UNAVAILABLE", help="a gRPC status code name, or SUCCESS_FALSE")
    api.add_argument("--delay", type=float, default=0.0, metavar="SECONDS", help="wait before answering")
    api.add_argument("--delay-first", type=int, default=0, metavar="N", help="delay only the first N calls")
    add_cli_options(api)
    api.set_defaults(func=_api_server)

    sample = sub.add_parser(
        "sample", help="write a sample .pkl in the real dataset's layout (Djinni: string Exp Years, UUID4 ids)"
    )
    sample.add_argument("--rows", type=int, required=True)
    sample.add_argument("--out", required=True, help="a .pkl, or a .parquet/.pq file (written as Parquet)")
    sample.add_argument("--dim", type=int, default=DEFAULT_DIMENSION)
    sample.add_argument("--seed", type=int, default=7)
    sample.add_argument(
        "--layout", choices=("djinni", "seed"), default="djinni", help="seed: docs/design.md §4.1's six"
    )
    sample.add_argument("--ids", choices=("uuid4", "uuid7"), help="default: uuid4 (djinni), uuid7 (seed)")
    sample.add_argument("--no-odd-cell", action="store_true", help="leave out the one row that goes to the DLQ")
    sample.add_argument(
        "--clusters", type=int, help="draw vectors from this many neighbourhoods (like text embeddings)"
    )
    sample.set_defaults(func=_sample)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:
        print(f"python -m dev {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
