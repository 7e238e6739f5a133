"""The connection forms in Airflow's real UI (``make ui-check``), in headless Debian chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BROWSER = ("/usr/bin/chromium", "/usr/bin/chromedriver")

pytestmark = pytest.mark.timeout(900)


def test_ui_check_finds_every_field_and_test_tells_the_truth(tmp_path: Path) -> None:
    missing = [path for path in BROWSER if not shutil.which(path)]
    if missing and os.environ.get("CI") != "true":
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install -y chromium chromium-driver)")
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "ui_check.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=800,
        check=False,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "FAILED" not in out
    for line in (
        "ok     embedding_grpc: 'Port' placeholder 50051",
        "ok     embedding_cache_grpc: 'Port' placeholder 50052",
        "ok     embedding_grpc: 'Auth token' is a password field",
        "ok     embedding_cache_grpc: 'Auth token' is a password field",
        "ok     saved cache_grpc_default through the form: embedding_cache_grpc",
        "ok     Test cache_grpc_default: green",
        "ok     Test embedding_grpc_default: green",
        "ok     Test cache_grpc_as_embedding_type: red",
    ):
        assert line in out, out
    shots = sorted(p.name for p in tmp_path.glob("*.png"))
    assert shots == [
        "connection-list-tested.png",
        "embedding_cache_grpc-extra-fields.png",
        "embedding_cache_grpc-standard-fields.png",
        "embedding_grpc-extra-fields.png",
        "embedding_grpc-standard-fields.png",
    ]
    assert all((tmp_path / s).stat().st_size > 10_000 for s in shots)
