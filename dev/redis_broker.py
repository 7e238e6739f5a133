"""A real Redis on 127.0.0.1 as the Celery broker of a throwaway Airflow deployment.

The ``redis-server`` binary comes from the operating system (Debian: ``apt-get install
redis-server``; ``.ci/run`` installs it in CI). It runs in the foreground as our child, in its own
process group, without persistence (a broker of a test keeps nothing), and is stopped by signal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from dev.stack import free_port


class RedisBroker:
    """``redis-server`` on a free port of 127.0.0.1.

    :param folder: its working directory and ``redis.log``.
    :param port: TCP port; a free one when not given.
    """

    def __init__(self, folder: Path, *, port: int | None = None) -> None:
        self.folder = Path(folder)
        self.port = port or free_port()
        self.log_path = self.folder / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The broker URL Celery takes (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, timeout: float = 30) -> RedisBroker:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not installed; on Debian/Ubuntu: apt-get update && apt-get install -y redis-server"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder)]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", str(self.log_path)]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}; see {self.log_path}")
            with contextlib.suppress(redis.RedisError):
                if client.ping():
                    client.close()
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server on port {self.port} did not answer PING after {timeout:g} s")
            time.sleep(0.1)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> RedisBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
