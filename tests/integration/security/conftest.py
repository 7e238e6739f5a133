"""Fixtures of the transport-security tests: a test PKI, a second unrelated one, and a token."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from tests.integration.security.pki import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA that signed nothing the servers use: trusting it must not be enough."""
    return make_pki(tmp_path_factory.mktemp("other-pki"), prefix="other-")


@pytest.fixture(scope="session")
def token() -> str:
    # A marker prefix makes a leak easy to spot in any output.
    return "tok-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory, token: str) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(token + "\n", encoding="utf-8")
    path.chmod(0o600)
    return path
