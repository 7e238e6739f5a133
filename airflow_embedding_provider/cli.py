"""``airflow-embedding``: the provider's servers and clients, as one command with sub-commands.

Production commands only: the dev tools (sample data, the reference API server with its fault
injection) are ``python -m dev`` in a checkout.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from airflow_embedding_provider.partitions import DEFAULT_MAX_PARTITIONS
from airflow_embedding_provider.pipeline import DEFAULT_SUB_BATCH_SIZE
from airflow_embedding_provider.rows import DEFAULT_DIMENSION
from airflow_embedding_provider.security import TOKEN_ENV, add_cli_options
from airflow_embedding_provider.storage.sync import DEFAULT_MAX_DELETE_FRACTION
from airflow_embedding_provider.upload_server.service import DEFAULT_GRACE, DEFAULT_IDLE_TIMEOUT, UploadSettings
from airflow_embedding_provider.wire.contract import (
    AI_SERVER_PORT,
    DEFAULT_CHUNK_SIZE,
    KEEPALIVE_SECONDS,
    KEEPALIVE_TIMEOUT_SECONDS,
    UPLOAD_SERVER_PORT,
)

#: Environment variable the upload server reads its DSN from when no option names one.
POSTGRES_DSN_ENV = "EMBEDDING_POSTGRES_DSN"


def _ai_server(args: argparse.Namespace) -> int:
    from airflow_embedding_provider.ai_server.dataset import load_dataset
    from airflow_embedding_provider.ai_server.service import serve
    from airflow_embedding_provider.security import ServerSecurity

    security = ServerSecurity.from_args(args)  # before loading: a bad option fails fast
    security.check_exposure(args.host)
    dataset = load_dataset(args.pkl, trust_pickle=args.trust_pickle)
    serve(dataset, host=args.host, port=args.port, max_streams=args.max_streams, security=security)
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
        db_writer_budget=args.db_writer_budget,
        max_concurrent_uploads=args.max_concurrent_uploads,
        stream_name=args.stream_name,
        cache_target=args.cache_target,
        idle_timeout=args.idle_timeout,
        keepalive=args.keepalive,
    )
    security = ServerSecurity.from_args(args)
    security.check_exposure(args.host)
    dsn = _postgres_dsn(args)
    connect = dsn_connector(dsn) if dsn else airflow_connector(args.postgres_conn_id)
    try:
        serve(UploadServicer(connect, settings), host=args.host, port=args.port, grace=args.grace, security=security)
    except (SchemaMismatchError, psycopg.Error) as exc:
        print(f"airflow-embedding upload-server: error: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    return 0


def _postgres_dsn(args: argparse.Namespace) -> str | None:
    """The upload server's DSN: ``--postgres-dsn-file``, ``--postgres-dsn`` or ``$EMBEDDING_POSTGRES_DSN``;
    ``None`` with ``--postgres-conn-id``. A file or the environment keeps the password out of ``ps``."""
    if args.postgres_conn_id:
        return None
    if args.postgres_dsn_file:
        dsn = Path(args.postgres_dsn_file).read_text(encoding="utf-8").strip()
        if not dsn:
            raise ValueError(f"--postgres-dsn-file {str(args.postgres_dsn_file)!r} is empty")
        return dsn
    if args.postgres_dsn:
        return str(args.postgres_dsn)
    dsn = os.environ.get(POSTGRES_DSN_ENV, "").strip()
    if not dsn:
        raise ValueError(
            f"no database: give --postgres-dsn-file FILE, ${POSTGRES_DSN_ENV} or --postgres-conn-id ID "
            "(--postgres-dsn works too, but shows the password in the process list)"
        )
    return dsn


def _token(args: argparse.Namespace) -> int:
    from airflow_embedding_provider.security import write_token_file

    created = write_token_file(args.out)
    print(f"{'wrote a new' if created else 'kept the'} bearer token in {args.out}")
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
        # Progress on a terminal only: piped or redirected, stderr carries errors alone.
        progress = sys.stderr if sys.stderr.isatty() else None
        result = push(
            args.pkl,
            settings,
            chunk_size=args.chunk_size,
            after=args.after or "",
            sync=args.sync,
            max_delete_fraction=args.max_delete_fraction,
            progress=progress,
        )
    except (UploadError, ValueError) as exc:
        print(f"airflow-embedding push: error: {exc}", file=sys.stderr)
        return 1
    if not result.success:
        print(f"airflow-embedding push: error: {result.message}", file=sys.stderr)
        return 1
    print(f"pushed {result.total_rows} rows: {result.message}")
    return 0


#: Exit status of ``search`` for input it cannot use (as argparse's own usage errors).
BAD_INPUT = 2


def _search(args: argparse.Namespace) -> int:
    import json

    import numpy as np
    import psycopg

    from airflow_embedding_provider.storage.search import Searcher, SearchError, parse_filters, stored_vector

    def fail(message: str, status: int = BAD_INPUT) -> int:
        print(f"airflow-embedding search: error: {message}", file=sys.stderr)
        return status

    try:
        filters = parse_filters(args.filter or [])
        queries = None
        if args.vector_file:
            try:
                queries = np.load(args.vector_file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                return fail(f"--vector-file {args.vector_file}: not a readable .npy array ({exc})")
        if args.postgres_conn_id:
            from airflow_embedding_provider.hooks.postgres import psycopg3_connection

            conn = psycopg3_connection(args.postgres_conn_id)
        else:
            conn = psycopg.connect(args.postgres_dsn, autocommit=True)
        with conn:
            if queries is None:
                queries = stored_vector(conn, args.like)
            hits = Searcher(conn).search(queries, args.k, filters)
    except SearchError as exc:
        return fail(str(exc))
    except psycopg.Error as exc:
        return fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, 1)
    for number, found in enumerate(hits):
        print(json.dumps({"query": number, "results": [hit.as_dict() for hit in found]}, ensure_ascii=False))
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
    ai.add_argument("--port", type=int, default=AI_SERVER_PORT)
    ai.add_argument(
        "--max-streams",
        type=int,
        default=DEFAULT_MAX_PARTITIONS,
        metavar="N",
        help="GetEmbeddings streams served at once, more are refused with RESOURCE_EXHAUSTED "
        "(default: the ingest DAG's max_partitions)",
    )
    add_cli_options(ai)
    ai.set_defaults(func=_ai_server)

    up = sub.add_parser("upload-server", help="ingest server: EmbeddingStreamService.UploadEmbeddings into PostgreSQL")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=UPLOAD_SERVER_PORT)
    db = up.add_mutually_exclusive_group()
    db.add_argument("--postgres-dsn-file", type=Path, metavar="FILE", help="a file holding the libpq connection string")
    db.add_argument(
        "--postgres-dsn",
        help=f"libpq connection string of the pgvector database (visible in ps: prefer --postgres-dsn-file "
        f"or ${POSTGRES_DSN_ENV}, the default)",
    )
    db.add_argument("--postgres-conn-id", help="an Airflow connection id instead of a DSN")
    up.add_argument("--dimension", type=int, default=DEFAULT_DIMENSION)
    up.add_argument("--sub-batch-size", type=int, default=DEFAULT_SUB_BATCH_SIZE, help="rows a transaction")
    up.add_argument(
        "--db-connections", type=int, default=UploadSettings.db_connections, help="connections (writers) an upload uses"
    )
    up.add_argument(
        "--db-writer-budget",
        type=int,
        default=UploadSettings.db_writer_budget,
        help="the most writers of all ingest tasks and uploads on the database at once, shared among them "
        "(0: none; README, 'Sizing a deployment')",
    )
    up.add_argument(
        "--max-concurrent-uploads",
        type=int,
        default=UploadSettings.max_concurrent_uploads,
        help="more are refused (RESOURCE_EXHAUSTED)",
    )
    up.add_argument("--stream-name", default=UploadSettings.stream_name, help="the checkpoint row uploads advance")
    up.add_argument(
        "--cache-target", default=UploadSettings.cache_target, help="cache marked stale in the outbox on changes"
    )
    up.add_argument("--grace", type=float, default=DEFAULT_GRACE, help="seconds SIGTERM waits for in-flight uploads")
    up.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        metavar="SECONDS",
        help="end an upload that sends nothing for this long (DEADLINE_EXCEEDED; what arrived stays committed)",
    )
    up.add_argument(
        "--keepalive",
        type=float,
        default=KEEPALIVE_SECONDS,
        metavar="SECONDS",
        help=f"ping quiet clients this often; one that does not answer within {KEEPALIVE_TIMEOUT_SECONDS:g} s is dropped",
    )
    add_cli_options(up)
    up.set_defaults(func=_upload_server)

    push = sub.add_parser("push", help="stream a .pkl to an upload server (UploadEmbeddings) and print the result")
    push.add_argument("--pkl", required=True, help="pickled pandas DataFrame in the design's layout")
    push.add_argument("--target", required=True, metavar="HOST:PORT", help="the upload server")
    push.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="rows a message")
    push.add_argument("--after", metavar="UUID", help="send only rows after this id (resume an aborted push)")
    push.add_argument(
        "--sync", action="store_true", help="make the tables equal to the file: delete stored rows it does not have"
    )
    push.add_argument(
        "--max-delete-fraction",
        type=float,
        metavar="F",
        help="with --sync: delete nothing and fail when more than this share of the stored rows would go "
        f"({DEFAULT_MAX_DELETE_FRACTION:g})",
    )
    push.add_argument("--tls-ca", metavar="PEM", help="TLS on: verify the server with this CA")
    push.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS")
    push.add_argument("--tls-key", metavar="PEM", help="client key for mutual TLS")
    push.add_argument("--tls-server-name", help="check the server certificate against this name")
    push.add_argument("--token-file", metavar="PATH", help=f"bearer token file (default: ${TOKEN_ENV})")
    push.set_defaults(func=_push)

    token = sub.add_parser("token", help="write a new random bearer token to a file, unless the file exists")
    token.add_argument("--out", required=True, type=Path, metavar="FILE", help="where (mode 0600)")
    token.set_defaults(func=_token)

    find = sub.add_parser(
        "search",
        help="the k nearest stored rows of query vectors (through the tuned ANN index); one JSON line a query",
    )
    found_db = find.add_mutually_exclusive_group(required=True)
    found_db.add_argument("--postgres-dsn", help="libpq connection string of the pgvector database")
    found_db.add_argument("--postgres-conn-id", help="an Airflow connection id instead of a DSN")
    query = find.add_mutually_exclusive_group(required=True)
    query.add_argument("--vector-file", metavar="Q.npy", help="queries: a .npy of shape (dim,) or (q, dim)")
    query.add_argument("--like", metavar="UUID", help="query with the vector stored for this id")
    find.add_argument("-k", type=int, default=10, help="rows a query (default 10)")
    find.add_argument(
        "--filter",
        action="append",
        metavar="EXPR",
        help="repeatable, all must hold: primary_keyword=Python, english_level>=upper, exp_years<=3",
    )
    find.set_defaults(func=_search)

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
