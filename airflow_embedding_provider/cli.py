"""``airflow-embedding``: the AI server and the local tools, as one command with sub-commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from airflow_embedding_provider.pipeline import DEFAULT_SUB_BATCH_SIZE
from airflow_embedding_provider.rows import DEFAULT_DIMENSION
from airflow_embedding_provider.security import TOKEN_ENV, add_cli_options


def _ai_server(args: argparse.Namespace) -> int:
    from airflow_embedding_provider.ai_server.dataset import load_dataset
    from airflow_embedding_provider.ai_server.service import serve
    from airflow_embedding_provider.security import ServerSecurity

    security = ServerSecurity.from_args(args)  # before loading: a bad option fails fast
    dataset = load_dataset(args.pkl, trust_pickle=args.trust_pickle)
    serve(dataset, host=args.host, port=args.port, security=security)
    return 0


def _api_server(args: argparse.Namespace) -> int:
    from airflow_embedding_provider.api_server.service import CacheServicer, FaultPlan, serve
    from airflow_embedding_provider.security import ServerSecurity

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
        security=ServerSecurity.from_args(args),
    )
    return 0


def _sample(args: argparse.Namespace) -> int:
    from airflow_embedding_provider.devkit.sample import write_sample

    path = write_sample(args.out, args.rows, dimension=args.dim, seed=args.seed)
    print(f"wrote {args.rows} rows of dimension {args.dim} to {path}")
    return 0


def _upload_server(args: argparse.Namespace) -> int:
    import psycopg

    from airflow_embedding_provider.security import ServerSecurity
    from airflow_embedding_provider.storage.schema import SchemaMismatchError
    from airflow_embedding_provider.upload_server.service import (
        UploadServicer,
        UploadSettings,
        airflow_connector,
        dsn_connector,
        serve,
    )

    settings = UploadSettings(
        dimension=args.dimension,
        sub_batch_size=args.sub_batch_size,
        db_connections=args.db_connections,
        max_concurrent_uploads=args.max_concurrent_uploads,
        stream_name=args.stream_name,
        cache_target=args.cache_target,
    )
    connect = dsn_connector(args.postgres_dsn) if args.postgres_dsn else airflow_connector(args.postgres_conn_id)
    security = ServerSecurity.from_args(args)
    try:
        serve(UploadServicer(connect, settings), host=args.host, port=args.port, grace=args.grace, security=security)
    except (SchemaMismatchError, psycopg.Error) as exc:
        print(f"airflow-embedding upload-server: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def _push(args: argparse.Namespace) -> int:
    from airflow_embedding_provider.hooks.grpc_channel import ChannelSettings
    from airflow_embedding_provider.upload_server.client import UploadError, push

    token = Path(args.token_file).read_text().strip() if args.token_file else os.environ.get(TOKEN_ENV) or None
    settings = ChannelSettings(
        target=args.target,
        use_tls=bool(args.tls_ca or args.tls_cert),
        ca_cert=args.tls_ca,
        client_cert=args.tls_cert,
        client_key=args.tls_key,
        token=token,
        tls_server_name=args.tls_server_name,
    )
    try:
        result = push(
            args.pkl,
            settings,
            chunk_size=args.chunk_size,
            after=args.after or "",
            sync=args.sync,
            max_delete_fraction=args.max_delete_fraction,
        )
    except (UploadError, ValueError) as exc:
        print(f"airflow-embedding push: error: {exc}", file=sys.stderr)
        return 1
    if not result.success:
        print(f"airflow-embedding push: error: {result.message}", file=sys.stderr)
        return 1
    print(f"pushed {result.total_rows} rows: {result.message}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="airflow-embedding", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    ai = sub.add_parser("ai-server", help="serve a .pkl over gRPC (EmbeddingStreamService.GetEmbeddings)")
    ai.add_argument("--pkl", required=True, help="DataFrame in the design's layout: a pickle, or .parquet")
    ai.add_argument(
        "--trust-pickle",
        action="store_true",
        help="unpickle anything (a pickle can run code); by default only plain pandas/numpy data loads",
    )
    ai.add_argument("--host", default="127.0.0.1")
    ai.add_argument("--port", type=int, default=50051)
    add_cli_options(ai)
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
    add_cli_options(api)
    api.set_defaults(func=_api_server)

    up = sub.add_parser("upload-server", help="ingest server: EmbeddingStreamService.UploadEmbeddings into PostgreSQL")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50053)
    db = up.add_mutually_exclusive_group(required=True)
    db.add_argument("--postgres-dsn", help="libpq connection string of the pgvector database")
    db.add_argument("--postgres-conn-id", help="an Airflow connection id instead of a DSN")
    up.add_argument("--dimension", type=int, default=DEFAULT_DIMENSION)
    up.add_argument("--sub-batch-size", type=int, default=DEFAULT_SUB_BATCH_SIZE, help="rows a transaction")
    up.add_argument("--db-connections", type=int, default=2, help="connections (writers) an upload uses")
    up.add_argument("--max-concurrent-uploads", type=int, default=4, help="more are refused (RESOURCE_EXHAUSTED)")
    up.add_argument("--stream-name", default="recruit_upload", help="the checkpoint row uploads advance")
    up.add_argument("--cache-target", default="recruit", help="cache marked stale in the outbox on changes")
    up.add_argument("--grace", type=float, default=60.0, help="seconds SIGTERM waits for in-flight uploads")
    add_cli_options(up)
    up.set_defaults(func=_upload_server)

    push = sub.add_parser("push", help="stream a .pkl to an upload server (UploadEmbeddings) and print the result")
    push.add_argument("--pkl", required=True, help="pickled pandas DataFrame in the design's layout")
    push.add_argument("--target", required=True, metavar="HOST:PORT", help="the upload server")
    push.add_argument("--chunk-size", type=int, default=300, help="rows a message")
    push.add_argument("--after", metavar="UUID", help="send only rows after this id (resume an aborted push)")
    push.add_argument(
        "--sync", action="store_true", help="make the tables equal to the file: delete stored rows it does not have"
    )
    push.add_argument(
        "--max-delete-fraction",
        type=float,
        metavar="F",
        help="with --sync: delete nothing and fail when more than this share of the stored rows would go (0.2)",
    )
    push.add_argument("--tls-ca", metavar="PEM", help="TLS on: verify the server with this CA")
    push.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    push.add_argument("--tls-key", metavar="PEM", help="client key for mutual TLS")
    push.add_argument("--tls-server-name", help="check the server certificate against this name")
    push.add_argument("--token-file", metavar="PATH", help=f"bearer token file (default: ${TOKEN_ENV})")
    push.set_defaults(func=_push)

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
