"""A real ingest over mutual TLS with bearer tokens, then a search for the secrets everywhere they could leak.

The AI server and the API server run as processes with ``--tls-cert``, ``--tls-key``,
``--tls-client-ca`` and ``--token-file``; the connections carry the token and the client
certificate; PostgreSQL is reached as a role with a password. After the run (and a run with a
wrong token), neither the token, the wrong token nor the password may appear in the
``airflow dags test`` output, the Airflow home's logs, the metadata database (XCom included), any
row of the data tables (DLQ included) or the servers' logs.
"""

from __future__ import annotations

import secrets
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pytest
from psycopg import sql

from airflow_embedding_provider.security import UNAUTHENTICATED_MESSAGE
from dev.embedded_postgres import EmbeddedPostgres
from dev.sample import make_sample
from dev.stack import HealthTLS, ServerProcess, airflow_env, dags_test, task_result
from tests.integration.security.pki import SERVER_NAME, Pki

pytestmark = pytest.mark.dag

DAG_ID = "recruit_embedding_ingest"
ROWS = 600


@dataclass(frozen=True)
class SecureStack:
    """The servers of one run and the secrets to look for."""

    ai: ServerProcess
    api: ServerProcess
    dsn: str
    password: str
    log_folder: Path


@pytest.fixture
def secure_stack(tmp_path: Path, postgres: EmbeddedPostgres, pki: Pki, token_file: Path) -> Iterator[SecureStack]:
    # A pkl with one NaN vector, so that the DLQ is not empty and its rows are searched too.
    frame = make_sample(ROWS, seed=23)
    vectors = [np.array(v, dtype=np.float32) for v in frame["job_post_vectors"]]
    vectors[7][3] = np.nan
    frame["job_post_vectors"] = pd.Series(vectors, index=frame.index, dtype=object)
    pkl = tmp_path / "with-nan.pkl"
    frame.to_pickle(pkl)

    # The embedded server trusts local connections; the password is still in the DSN, which is what must not leak.
    password = "pw-" + secrets.token_urlsafe(18)
    role, database = f"secret_{uuid.uuid4().hex[:8]}", f"t_secrets_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
        )
        conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(role)))
    dsn = f"postgresql://{role}:{password}@127.0.0.1:{postgres.port}/{database}"

    security = pki.server_options(token_file)
    health = HealthTLS(ca=pki.ca, client_cert=pki.client_cert, client_key=pki.client_key, server_name=SERVER_NAME)
    logs = tmp_path / "server-logs"
    logs.mkdir()
    # DEBUG: whatever our servers can log, they log; none of it may be a secret.
    ai = ServerProcess(
        ["--log-level", "DEBUG", "ai-server", "--pkl", str(pkl), *security],
        log_path=logs / "ai.log",
        health_tls=health,
    )
    api = ServerProcess(
        ["--log-level", "DEBUG", "api-server", "--stats-file", str(tmp_path / "stats.json"), *security],
        log_path=logs / "api.log",
        health_tls=health,
    )
    with ai, api:
        yield SecureStack(ai=ai, api=api, dsn=dsn, password=password, log_folder=logs)
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def _env(stack: SecureStack, airflow_home: Path, pki: Pki, token: str) -> dict[str, str]:
    return airflow_env(
        airflow_home,
        postgres_dsn=stack.dsn,
        embedding_target=stack.ai.target,
        cache_target=stack.api.target,
        grpc_extra={
            "use_tls": True,
            "ca_cert": str(pki.ca),
            "client_cert": str(pki.client_cert),
            "client_key": str(pki.client_key),
            "tls_server_name": SERVER_NAME,
            "token": token,
        },
        extra={"RECRUIT_EMBEDDING_RETRIES": "0"},
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _xcom_values(airflow_home: Path) -> list[str]:
    with sqlite3.connect(airflow_home / "airflow.db") as db:
        rows = db.execute("SELECT dag_id, task_id, key, value FROM xcom").fetchall()
    return [" ".join(str(part) for part in row) for row in rows]


def _table_rows(dsn: str) -> dict[str, list[str]]:
    """Every row of every table in the database, as JSON text, by table."""
    out: dict[str, list[str]] = {}
    with psycopg.connect(dsn) as conn:
        tables = [
            name
            for (name,) in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
            ).fetchall()
        ]
        for table in tables:
            query = sql.SQL("SELECT row_to_json(t)::text FROM {} AS t").format(sql.Identifier(table))
            out[table] = [row[0] for row in conn.execute(query).fetchall()]
    return out


def _leaks(secret: str, places: dict[str, Any]) -> list[str]:
    """Where ``secret`` occurs: each place's name and the text around it, the secret itself blanked out."""
    needle = secret.encode()
    found = []
    for name, text in places.items():
        data = text if isinstance(text, bytes) else str(text).encode()
        at = data.find(needle)
        if at >= 0:
            around = data[max(0, at - 300) : at + len(needle) + 100].replace(needle, b"<SECRET>")
            found.append(f"{name}: ...{around.decode(errors='replace')}...")
    return found


def test_an_ingest_over_mutual_tls_with_tokens_leaks_no_secret(
    secure_stack: SecureStack, airflow_home: Path, pki: Pki, token: str
) -> None:
    stack = secure_stack
    # The token reaches the servers through a file: it is not on any command line (``ps``).
    assert all(token not in " ".join(server.command) for server in (stack.ai, stack.api))

    # Airflow at INFO, as deployed: at DEBUG, Airflow's own task supervisor logs each MaskSecret
    # message with the secret in clear ("Received message from task"), which is not ours to fix.
    run = dags_test(DAG_ID, _env(stack, airflow_home, pki, token), conf={"rows_per_partition": 200})
    result = task_result(airflow_home, DAG_ID, "finalize")
    assert result["rows_received"] == ROWS and result["partitions"] == 3
    assert result["rows_dlq"] == 1 and result["inserted"] == ROWS - 1
    assert task_result(airflow_home, DAG_ID, "invalidate_cache")["status"] == "delivered"

    # The same run with a wrong token fails clearly, and neither token shows in its output.
    wrong_token = "wrong-" + secrets.token_urlsafe(18)
    refused = dags_test(DAG_ID, _env(stack, airflow_home, pki, wrong_token), check=False)
    assert refused.returncode != 0
    refused_output = refused.stdout + refused.stderr
    assert "UNAUTHENTICATED" in refused_output and UNAUTHENTICATED_MESSAGE in refused_output

    tables = _table_rows(stack.dsn)
    dlq = tables["recruit_embedding_dlq"]
    assert len(dlq) == 1 and "non_finite_vector" in dlq[0]
    server_logs = _files(stack.log_folder)
    assert any(b"GetEmbeddings" in text for text in server_logs.values())  # the logs were written
    # ``dags test`` runs the tasks in its own process: their logs are in its output; the folder is searched anyway.
    assert "finalize" in run.stdout + run.stderr
    airflow_logs = _files(airflow_home / "logs")

    places: dict[str, Any] = {
        "dags test stdout": run.stdout,
        "dags test stderr": run.stderr,
        "refused run output": refused_output,
        **{f"airflow log {name}": text for name, text in airflow_logs.items()},
        **{f"xcom {i}": value for i, value in enumerate(_xcom_values(airflow_home))},
        "metadata database file": (airflow_home / "airflow.db").read_bytes(),
        **{f"table {table}": "\n".join(rows) for table, rows in tables.items()},
        **{f"server log {name}": text for name, text in server_logs.items()},
    }
    for secret in (token, wrong_token, stack.password):
        leaks = _leaks(secret, places)
        assert not leaks, f"a secret ({secret[:4]}...) leaked:\n" + "\n".join(leaks)
