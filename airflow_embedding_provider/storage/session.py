"""How long the provider's database sessions wait: ``statement_timeout`` and ``lock_timeout``.

Without them a writer that queues behind another session's lock (a long ``ALTER TABLE``, a
forgotten open transaction, a manual ``LOCK TABLE``) waits for ever, and so does its task. Every
connection the provider opens gets both; a statement that runs out fails with a message that says
which limit, where to look and how to change it, so the task fails (and its retry resumes) instead
of hanging (docs/design.md §9).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import psycopg

#: Environment variables, in seconds (``0`` = no limit), read where a connection is opened.
STATEMENT_TIMEOUT_ENV = "RECRUIT_EMBEDDING_STATEMENT_TIMEOUT"
LOCK_TIMEOUT_ENV = "RECRUIT_EMBEDDING_LOCK_TIMEOUT"
DEFAULT_STATEMENT_TIMEOUT = 300.0
DEFAULT_LOCK_TIMEOUT = 60.0


def _seconds(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds (0 = no limit), got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must not be negative (0 = no limit), got {raw!r}")
    return value


@dataclass(frozen=True)
class SessionTimeouts:
    """Limits of one session, in seconds; ``0`` turns one off.

    :param statement_timeout: the longest a statement may run (waiting for locks included).
    :param lock_timeout: the longest a statement may wait for one lock.
    """

    statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SessionTimeouts:
        """From :data:`STATEMENT_TIMEOUT_ENV` and :data:`LOCK_TIMEOUT_ENV`; defaults when unset."""
        env = os.environ if environ is None else environ
        return cls(
            statement_timeout=_seconds(env, STATEMENT_TIMEOUT_ENV, DEFAULT_STATEMENT_TIMEOUT),
            lock_timeout=_seconds(env, LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT),
        )

    def apply(self, conn: psycopg.Connection) -> None:
        """Set both limits for the rest of the session (outside any transaction)."""
        with conn.transaction():
            conn.execute(
                "SELECT set_config('statement_timeout', %s, false), set_config('lock_timeout', %s, false)",
                (_ms(self.statement_timeout), _ms(self.lock_timeout)),
            )


def _ms(seconds: float) -> str:
    return str(round(seconds * 1000))


@contextlib.contextmanager
def without_statement_timeout(conn: psycopg.Connection) -> Iterator[None]:
    """Lift ``statement_timeout`` for the body (an ANN index build may take longer than any
    statement should; the task's ``execution_timeout`` bounds it), then put it back."""
    row = conn.execute("SELECT current_setting('statement_timeout')").fetchone()
    previous = str(row[0]) if row else "0"
    conn.execute("SELECT set_config('statement_timeout', '0', false)")
    try:
        yield
    finally:
        if not conn.closed:
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (previous,))


class DatabaseTimeoutError(RuntimeError):
    """A statement ran out of ``lock_timeout`` or ``statement_timeout``; the message says which."""


def explain_timeout(exc: BaseException, timeouts: SessionTimeouts | None = None) -> DatabaseTimeoutError | None:
    """A :class:`DatabaseTimeoutError` that explains ``exc``, or ``None`` when it is no timeout."""
    limits = timeouts or SessionTimeouts.from_env()
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return DatabaseTimeoutError(
            f"PostgreSQL gave up waiting for a lock after {limits.lock_timeout:g} s ({LOCK_TIMEOUT_ENV}): another "
            "session holds a lock on a table this task uses (an open transaction, a LOCK TABLE, a long ALTER). "
            "Find it with: SELECT pid, state, xact_start, query FROM pg_stat_activity WHERE xact_start < now() - "
            "interval '1 minute'; end it or wait for it, then retry (the task resumes from what it committed). "
            f"PostgreSQL said: {detail}"
        )
    if isinstance(exc, psycopg.errors.QueryCanceled) and "statement timeout" in str(exc):
        return DatabaseTimeoutError(
            f"a statement ran longer than {limits.statement_timeout:g} s ({STATEMENT_TIMEOUT_ENV}), waiting on "
            "locks included; raise the limit if the database is just slow, then retry (the task resumes from "
            f"what it committed). PostgreSQL said: {detail}"
        )
    return None


@contextlib.contextmanager
def timeouts_explained(timeouts: SessionTimeouts | None = None) -> Iterator[None]:
    """Re-raise a timeout from the body as :class:`DatabaseTimeoutError` (see :func:`explain_timeout`)."""
    try:
        yield
    except psycopg.Error as exc:
        explained = explain_timeout(exc, timeouts)
        if explained is None:
            raise
        raise explained from exc
