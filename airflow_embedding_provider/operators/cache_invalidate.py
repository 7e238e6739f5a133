"""``CacheInvalidateOperator``: tell the API server to drop a cache target after the data changed."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from tenacity import RetryCallState

from airflow_embedding_provider.hooks.grpc_cache import CacheInvalidationError, GrpcCacheHook, RetryPolicy
from airflow_embedding_provider.hooks.postgres import EmbeddingPostgresHook
from airflow_embedding_provider.metrics import record_cache_delivery
from airflow_embedding_provider.storage.outbox import DEFAULT_CACHE_TARGET, deliver, pending_entries

if TYPE_CHECKING:
    from airflow.sdk import Context

RETRY_DAG_ID = "recruit_cache_invalidate_retry"
#: How much longer than one call's deadline a deliverer waits for another one's call in flight.
LOCK_WAIT_MARGIN = 5.0


class CacheInvalidationPendingError(RuntimeError):
    """The invalidation could not be delivered now and ``fail_on_pending`` asks to fail."""


class CacheInvalidateOperator(BaseOperator):
    """Calls ``CacheService.InvalidateCache(target)`` with retries (docs/design.md §7.4, 10.1-10.2).

    With ``postgres_conn_id`` it delivers through the outbox: one call covers every pending entry
    of the target, single-flight across processes, and when no entry is pending (the run changed
    nothing) it makes no call. Without it, it calls unconditionally.

    Retryable failures (see :mod:`~airflow_embedding_provider.hooks.grpc_cache`) are retried
    ``attempts`` times in all with exponential backoff and jitter, each call with its own deadline.
    If they persist, the data stays stored and the run goes on: the entries stay pending for the
    ``recruit_cache_invalidate_retry`` DAG, with a warning in the log and ``status: pending`` in
    the returned XCom, unless ``fail_on_pending`` is set. Errors that a retry cannot fix fail the
    task, as does any failure without an outbox (nothing would retry it later).

    Returns ``{"target", "status", "calls", "entries", "error"}``; status is ``delivered``,
    ``invalidated`` (no outbox), ``nothing_pending`` or ``pending``.

    :param target: the cache target, e.g. ``recruit``. Templated.
    :param grpc_conn_id: ``embedding_grpc`` connection of the API server.
    :param postgres_conn_id: PostgreSQL connection holding the outbox; ``None`` = no outbox.
    :param attempts: tries in all (the design asks for 3).
    :param call_timeout: deadline of one call in seconds; ``None`` = the connection's ``timeout``.
    :param initial_backoff: seconds before the second try, doubling after that.
    :param max_backoff: cap of one wait between tries, in seconds.
    :param fail_on_pending: fail the task instead of leaving the entries pending.
    """

    template_fields: Sequence[str] = ("target", "grpc_conn_id", "postgres_conn_id")
    ui_color = "#fdebd0"

    def __init__(
        self,
        *,
        target: str = DEFAULT_CACHE_TARGET,
        grpc_conn_id: str = GrpcCacheHook.default_conn_name,
        postgres_conn_id: str | None = None,
        attempts: int = RetryPolicy.attempts,
        call_timeout: float | None = None,
        initial_backoff: float = RetryPolicy.initial_backoff,
        max_backoff: float = RetryPolicy.max_backoff,
        fail_on_pending: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.target = target
        self.grpc_conn_id = grpc_conn_id
        self.postgres_conn_id = postgres_conn_id
        self.policy = RetryPolicy(attempts=attempts, initial_backoff=initial_backoff, max_backoff=max_backoff)
        self.call_timeout = call_timeout
        self.fail_on_pending = fail_on_pending

    def execute(self, context: Context) -> dict[str, Any]:
        target = (self.target or "").strip()
        if not target:
            raise ValueError("target is empty: name the API server's cache to drop, e.g. 'recruit'")
        hook = GrpcCacheHook(self.grpc_conn_id)
        with contextlib.closing(hook):
            timeout = hook.settings.timeout if self.call_timeout is None else self.call_timeout
            calls = 0

            def call(name: str) -> None:
                nonlocal calls
                calls += 1
                hook.invalidate(name, timeout=timeout)

            if self.postgres_conn_id is None:
                self.policy.run(lambda: call(target), before_sleep=self._log_retry)
                self.log.info("invalidated the API server's cache %r with %d call(s)", target, calls)
                return self._result(target, "invalidated", calls, 0)
            postgres = EmbeddingPostgresHook(postgres_conn_id=self.postgres_conn_id)
            conn = postgres.get_psycopg3_conn()
            with contextlib.closing(conn):
                try:
                    delivery = self.policy.run(
                        lambda: deliver(
                            conn, target, call, lock_wait=timeout + LOCK_WAIT_MARGIN, tables=postgres.tables
                        ),
                        before_sleep=self._log_retry,
                    )
                except CacheInvalidationError as exc:
                    if not exc.retryable:
                        raise
                    pending = len(pending_entries(conn, target, postgres.tables))
                    record_cache_delivery(0, pending, dag_id=self.dag_id, target=target)
                    return self._pending(target, calls, pending, str(exc))
                pending = len(pending_entries(conn, target, postgres.tables))
                record_cache_delivery(len(delivery.entry_ids), pending, dag_id=self.dag_id, target=target)
                if delivery.outcome == "busy":
                    # The holder delivers what it read; what it did not read waits for the next deliverer.
                    error = f"another deliverer held the lock of {target!r} for over {timeout + LOCK_WAIT_MARGIN:g} s"
                    return self._pending(target, calls, pending, error)
        if delivery.outcome == "nothing_pending":
            self.log.info("no pending invalidation of %r: nothing changed or another deliverer did it", target)
        else:
            self.log.info(
                "invalidated the API server's cache %r: %d outbox entries delivered with %d call(s)",
                target,
                len(delivery.entry_ids),
                calls,
            )
        return self._result(target, delivery.outcome, calls, len(delivery.entry_ids))

    def _pending(self, target: str, calls: int, entries: int, error: str) -> dict[str, Any]:
        message = (
            f"cache invalidation of {target!r} is still pending after {calls} call(s): {error}. "
            f"{entries} outbox entries stay pending; the {RETRY_DAG_ID} DAG delivers them once the API server answers"
        )
        if self.fail_on_pending:
            raise CacheInvalidationPendingError(message)
        self.log.warning("%s (fail_on_pending=True fails this task instead)", message)
        return self._result(target, "pending", calls, entries, error)

    @staticmethod
    def _result(target: str, status: str, calls: int, entries: int, error: str | None = None) -> dict[str, Any]:
        return {"target": target, "status": status, "calls": calls, "entries": entries, "error": error}

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        self.log.warning(
            "attempt %d of %d failed: %s; retrying in %.1f s", state.attempt_number, self.policy.attempts, exc, wait
        )
