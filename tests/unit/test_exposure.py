"""Nothing published without a token: the loopback rule, ``--insecure``, the generated token file,
the DSN kept out of argv and the client's warning before a plaintext token."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from airflow_embedding_provider.cli import POSTGRES_DSN_ENV, _postgres_dsn, build_parser
from airflow_embedding_provider.hooks.grpc_channel import ChannelSettings
from airflow_embedding_provider.security import ServerSecurity, is_loopback, write_token_file

REFUSAL = "refusing to listen on 0.0.0.0 without a bearer token"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.53", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("[::]", False), ("10.0.0.5", False), ("ai-server", False)],
)  # fmt: skip
def test_only_loopback_addresses_count_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_public_bind_needs_a_token_or_insecure() -> None:
    with pytest.raises(ValueError, match=REFUSAL.replace(".", r"\.")) as info:
        ServerSecurity().check_exposure("0.0.0.0")
    assert "--token-file" in str(info.value) and "--insecure" in str(info.value)
    ServerSecurity(token="t").check_exposure("0.0.0.0")
    ServerSecurity(insecure=True).check_exposure("0.0.0.0")
    ServerSecurity().check_exposure("127.0.0.1")


@pytest.mark.parametrize(
    ("module", "prog", "command"),
    [
        ("airflow_embedding_provider.cli", "airflow-embedding", ["ai-server", "--pkl", "does-not-matter.pkl"]),
        ("dev", "python -m dev", ["api-server"]),
        (
            "airflow_embedding_provider.cli",
            "airflow-embedding",
            ["upload-server", "--postgres-dsn-file", "does-not-matter"],
        ),
    ],
)
def test_every_server_command_refuses_a_public_bind_without_a_token_in_one_line(
    module: str, prog: str, command: list[str]
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EMBEDDING_GRPC_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *command, "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog} {command[0]}: error: {REFUSAL}"), lines


def test_the_token_command_writes_a_private_token_once(tmp_path: Path) -> None:
    path = tmp_path / "secrets" / "grpc-token"
    assert write_token_file(path) is True
    token = path.read_text(encoding="utf-8").strip()
    assert len(token) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert write_token_file(path) is False  # a restart keeps the token clients were given
    assert path.read_text(encoding="utf-8").strip() == token
    args = build_parser().parse_args(["token", "--out", str(tmp_path / "other")])
    assert args.func(args) == 0 and (tmp_path / "other").read_text().strip() != token


def _upload_args(*extra: str) -> object:
    return build_parser().parse_args(["upload-server", *extra])


def test_the_upload_server_reads_its_dsn_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "dsn"
    secret.write_text("postgresql://u:pw@db/x\n", encoding="utf-8")
    monkeypatch.delenv(POSTGRES_DSN_ENV, raising=False)
    assert _postgres_dsn(_upload_args("--postgres-dsn-file", str(secret))) == "postgresql://u:pw@db/x"  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no database: give --postgres-dsn-file FILE, \\$EMBEDDING_POSTGRES_DSN"):
        _postgres_dsn(_upload_args())  # type: ignore[arg-type]
    monkeypatch.setenv(POSTGRES_DSN_ENV, "postgresql://u:pw@db/env")
    assert _postgres_dsn(_upload_args()) == "postgresql://u:pw@db/env"  # type: ignore[arg-type]
    assert _postgres_dsn(_upload_args("--postgres-conn-id", "postgres_default")) is None  # type: ignore[arg-type]
    secret.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        _postgres_dsn(_upload_args("--postgres-dsn-file", str(secret)))  # type: ignore[arg-type]


def test_a_client_warns_before_it_sends_a_token_over_plaintext(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="airflow_embedding_provider.hooks.grpc_channel")
    ChannelSettings(target="127.0.0.1:1", token="secret-tok").open_channel().close()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "bearer token to 127.0.0.1:1 over a plaintext channel" in warnings[0]
    assert "secret-tok" not in warnings[0]
    caplog.clear()
    ChannelSettings(target="127.0.0.1:1").open_channel().close()  # no token: nothing to warn about
    assert not caplog.records


def test_a_connection_reads_its_token_from_token_file(tmp_path: Path) -> None:
    path = tmp_path / "tok"
    path.write_text("tok-from-file\n", encoding="utf-8")
    conn = SimpleNamespace(conn_id="c", host="h", port=1, password=None, extra_dejson={"token_file": str(path)})
    assert ChannelSettings.from_connection(conn, default_port=1).token == "tok-from-file"
    missing = SimpleNamespace(**{**vars(conn), "extra_dejson": {"token_file": str(tmp_path / "none")}})
    with pytest.raises(ValueError, match="connection 'c': cannot read token_file"):
        ChannelSettings.from_connection(missing, default_port=1)
