"""A real PostgreSQL 16 with pgvector on 127.0.0.1, from the binaries of the ``pgserver`` wheel.

We run ``postgres`` ourselves instead of through ``pgserver.get_server`` so that it listens on TCP
(Airflow connections, fault tests) and so that we can stop, kill and restart it: as root,
PostgreSQL must run as another user (``pgserver``), and ``pg_ctl`` as root cannot stop it, so we
signal the postmaster we started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

RUN_AS = "pgserver"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pgserver() -> Any:
    """The ``pgserver`` wheel's modules; importing it warns about XDG_RUNTIME_DIR, which we never use."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver._commands
        import pgserver.utils
    return pgserver


def _bin(name: str) -> str:
    return str(_pgserver()._commands.POSTGRES_BIN_PATH / name)


class EmbeddedPostgres:
    """One PostgreSQL server over ``data_dir`` (created on first start).

    :param data_dir: the cluster's folder; kept between starts, so data survives a restart.
    :param port: TCP port on 127.0.0.1; a free one when not given.
    """

    def __init__(self, data_dir: str | Path, *, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
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
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGINT)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()

    def start(self, timeout: float = 30) -> EmbeddedPostgres:
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self._stop_stale()
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        if self._user is not None:
            self._own(self.log_path)
        # Durability settings favour speed: this server holds demo and test data only.
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
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=256MB",
                "-c",
                "maintenance_work_mem=512MB",
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
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def embedded_postgres(data_dir: str | Path, *, port: int | None = None) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(data_dir, port=port)
    with server:
        yield server
