"""What a person at the terminal sees: ``push`` progress on a terminal only, the AI server's load steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

from airflow_embedding_provider.ai_server.dataset import PROGRESS_MIN_BYTES
from dev.sample import write_sample
from dev.stack import ServerProcess
from tests.integration.upload_server.conftest import StartServer
from tests.integration.upload_server.test_upload_server import push

ROWS = 25_000  # about 42 MiB as a pickle: a "big" file for the AI server's load log


def _push_on_a_terminal(pkl: Path, target: str) -> tuple[int, str, str]:
    """``push`` with its stderr on a pseudo-terminal (as in a shell), stdout piped."""
    leader, follower = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_embedding_provider.cli", "push", "--pkl", str(pkl), "--target", target],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
    )
    os.close(follower)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the process closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=600)
    reader.join(10)
    os.close(leader)
    return proc.returncode, stdout, b"".join(chunks).decode(errors="replace")


def test_push_shows_progress_on_a_terminal_and_is_quiet_when_piped(
    upload_server: StartServer, pg_dsn: str, tmp_path: Path
) -> None:
    pkl = write_sample(tmp_path / "big.pkl", ROWS, seed=4)
    server = upload_server()

    code, stdout, terminal = _push_on_a_terminal(pkl, server.target)
    assert code == 0, terminal[-3000:]
    assert f"pushed {ROWS} rows" in stdout
    lines = [part for part in re.split(r"\r\x1b\[K|\n", terminal) if part.startswith("sent ")]
    assert lines, terminal[-3000:]
    pattern = re.compile(r"sent ([\d,]+) of ([\d,]+) rows \((\d+)%\), ([\d,]+) rows/s, (\d\d:\d\d:\d\d|--:--) left")
    parsed = [pattern.fullmatch(line.strip()) for line in lines]
    assert all(parsed), lines
    sent = [int(m.group(1).replace(",", "")) for m in parsed if m]
    assert sent == sorted(sent) and sent[-1] == ROWS
    assert {m.group(2) for m in parsed if m} == {f"{ROWS:,}"}
    last = parsed[-1]
    assert last is not None and last.group(3) == "100" and last.group(5) == "00:00:00"
    assert int(last.group(4).replace(",", "")) > 0

    piped = push(pkl, server.target)  # stdout and stderr both pipes
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert f"pushed {ROWS} rows" in piped.stdout
    assert "sent " not in piped.stderr and "rows/s" not in piped.stderr and "\r" not in piped.stderr


def test_ai_server_logs_its_load_steps_for_a_big_file(tmp_path: Path) -> None:
    big = write_sample(tmp_path / "big.pkl", ROWS, seed=4)
    small = write_sample(tmp_path / "small.pkl", 100, seed=4)
    assert big.stat().st_size >= PROGRESS_MIN_BYTES > small.stat().st_size
    for pkl, expect_steps in ((big, True), (small, False)):
        log_path = tmp_path / f"{pkl.stem}.log"
        with ServerProcess(["ai-server", "--pkl", str(pkl)], log_path=log_path):
            pass
        text = log_path.read_text()
        steps = [
            f"loading {pkl}",
            f"read {ROWS:,} rows",
            "checked the metadata columns",
            f"packed {ROWS:,} vectors of dimension 384",
            f"ordered by id: {ROWS:,} rows ready to serve",
        ]
        if expect_steps:
            positions = [text.find(step) for step in steps]
            assert all(p >= 0 for p in positions) and positions == sorted(positions), text[-3000:]
            assert re.search(r"ready to serve \[\d+\.\d s\]", text), text[-3000:]
        else:
            assert "loading " not in text and "ready to serve" not in text, text[-3000:]
