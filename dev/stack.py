"""Start the pieces of a local run as real processes: the AI server and Airflow commands.

Shared by ``make demo``, the integration tests and the benchmarks, so that all three run the
system the same way a deployment does.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airflow_embedding_provider.wire.contract import DEFAULT_CALL_TIMEOUT
from dev.cli import COMMANDS as DEV_COMMANDS

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO_ROOT / "dags"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the kernel's pick)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class HealthTLS:
    """How :func:`wait_healthy` reaches a TLS server (health checks need no token).

    :param ca: PEM CA that signed the server's certificate.
    :param client_cert: PEM client certificate, for a server that requires mutual TLS.
    :param client_key: PEM key of ``client_cert``.
    :param server_name: the name to check the certificate against instead of the host.
    """

    ca: Path
    client_cert: Path | None = None
    client_key: Path | None = None
    server_name: str | None = None


def _health_channel(target: str, tls: HealthTLS | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls.ca).read_bytes(),
        private_key=Path(tls.client_key).read_bytes() if tls.client_key else None,
        certificate_chain=Path(tls.client_cert).read_bytes() if tls.client_cert else None,
    )
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(target, credentials, options=options)


def wait_healthy(
    target: str, *, timeout: float = 60, proc: subprocess.Popen[Any] | None = None, tls: HealthTLS | None = None
) -> None:
    """Poll the gRPC health service at ``target`` until it answers SERVING; over TLS with ``tls``."""
    deadline = time.monotonic() + timeout
    with _health_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server process exited with {proc.returncode} before it was healthy")
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no healthy gRPC server at {target} after {timeout:g} s")
            time.sleep(0.1)


def _subcommand(command: Sequence[str]) -> str | None:
    """The sub-command of a command line: its first word after the global ``--log-level LEVEL``."""
    words = list(command)
    while words[:1] == ["--log-level"]:
        words = words[2:]
    return words[0] if words else None


class ServerProcess:
    """A CLI server as a child process on 127.0.0.1: ``airflow-embedding <command> ...``, or
    ``python -m dev <command> ...`` for the dev tools' commands (the reference API server)."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        port: int | None = None,
        log_path: Path | None = None,
        health_tls: HealthTLS | None = None,
    ) -> None:
        self.port = port or free_port()
        self.health_tls = health_tls
        module = "dev" if _subcommand(command) in DEV_COMMANDS else "airflow_embedding_provider.cli"
        self.command = [
            sys.executable,
            "-m",
            module,
            *command,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> ServerProcess:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        # dev/ is no installed package: the child finds it through the checkout, from any folder.
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_healthy(self.target, timeout=timeout, proc=self.proc, tls=self.health_tls)
        return self

    def stop(self, *, kill: bool = False) -> int | None:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill() if kill else proc.terminate()
        return proc.wait(30)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def airflow_env(
    airflow_home: Path,
    *,
    postgres_dsn: str,
    embedding_target: str,
    cache_target: str | None = None,
    extra: Mapping[str, str] | None = None,
    grpc_extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Environment for an Airflow command in a throwaway ``AIRFLOW_HOME`` with our connections.

    ``cache_target`` (``host:port`` of the API server) adds the ``cache_grpc_default`` connection.
    ``grpc_extra`` is merged into both gRPC connections' extras (``use_tls``, ``ca_cert``, ``token``, ...).
    """
    host, port = embedding_target.rsplit(":", 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_POSTGRES_DEFAULT": postgres_dsn,
            "AIRFLOW_CONN_EMBEDDING_GRPC_DEFAULT": json.dumps(
                {
                    "conn_type": "embedding_grpc",
                    "host": host,
                    "port": int(port),
                    "extra": {"timeout": DEFAULT_CALL_TIMEOUT, **(grpc_extra or {})},
                }
            ),
            "RECRUIT_EMBEDDING_SCHEDULE": "none",
        }
    )
    if cache_target is not None:
        cache_host, cache_port = cache_target.rsplit(":", 1)
        env["AIRFLOW_CONN_CACHE_GRPC_DEFAULT"] = json.dumps(
            {
                "conn_type": "embedding_cache_grpc",
                "host": cache_host,
                "port": int(cache_port),
                "extra": {"timeout": 5, **(grpc_extra or {})},
            }
        )
    env.update(extra or {})
    return env


def airflow(
    args: Sequence[str], env: Mapping[str, str], *, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run ``airflow <args>`` with ``env``; output captured as text."""
    airflow_bin = Path(sys.executable).with_name("airflow")
    result = subprocess.run(
        [str(airflow_bin), *args], env=dict(env), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"airflow {' '.join(args)} exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def prepare_airflow_home(env: Mapping[str, str]) -> None:
    """Create the metadata database (SQLite) of a throwaway ``AIRFLOW_HOME``."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    airflow(["db", "migrate"], env)


def dags_test(
    dag_id: str, env: Mapping[str, str], *, conf: Mapping[str, Any] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    args = ["dags", "test", dag_id]
    if conf:
        args += ["--conf", json.dumps(conf)]
    return airflow(args, env, check=check)


def task_result(airflow_home: Path, dag_id: str, task_id: str, *, key: str = "return_value") -> Any:
    """The newest XCom ``key`` of ``dag_id.task_id``, read from a throwaway home's SQLite database."""
    with sqlite3.connect(airflow_home / "airflow.db") as db:
        row = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = ? ORDER BY timestamp DESC LIMIT 1",
            (dag_id, task_id, key),
        ).fetchone()
    if row is None:
        raise LookupError(f"no XCom {key!r} from {dag_id}.{task_id}")
    value = json.loads(row[0])
    return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value


def start_dags_test(
    dag_id: str, env: Mapping[str, str], *, log_path: Path, conf: Mapping[str, Any] | None = None
) -> subprocess.Popen[bytes]:
    """``airflow dags test`` in the background (its own process group), output to ``log_path``."""
    args = [str(Path(sys.executable).with_name("airflow")), "dags", "test", dag_id]
    if conf:
        args += ["--conf", json.dumps(conf)]
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
