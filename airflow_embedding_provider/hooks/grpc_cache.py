"""``GrpcCacheHook``: asks the API server's ``CacheService`` to drop a cache target (docs/design.md §7.4).

Retry policy (docs/design.md §10.2), shared by every caller through :class:`RetryPolicy`:

* retried: ``UNAVAILABLE``, ``DEADLINE_EXCEEDED``, ``RESOURCE_EXHAUSTED``, ``ABORTED`` and
  ``INTERNAL`` (gRPC also reports transport resets as ``INTERNAL``), and an answer of
  ``success=false`` (the server could not drop its cache this time). Invalidation is idempotent,
  so retrying a call that did reach the server is harmless.
* not retried: every other code (``UNKNOWN``, ``INVALID_ARGUMENT``, ``UNAUTHENTICATED``,
  ``PERMISSION_DENIED``, ``UNIMPLEMENTED``, ...): the request or the configuration is wrong and
  asking again cannot fix it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from airflow_embedding_provider.hooks.grpc_base import GrpcServiceHook
from airflow_embedding_provider.wire import embedding_pb2, embedding_pb2_grpc
from airflow_embedding_provider.wire.contract import API_SERVER_PORT as DEFAULT_PORT
from airflow_embedding_provider.wire.contract import CACHE_SERVICE

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
    }
)
T = TypeVar("T")


class CacheInvalidationError(RuntimeError):
    """One ``InvalidateCache`` call failed; ``retryable`` says whether asking again may help."""

    def __init__(self, message: str, *, retryable: bool, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.code = code


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, CacheInvalidationError) and exc.retryable


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries with exponential backoff plus jitter between them, retryable errors only.

    :param attempts: tries in all (the design asks for 3).
    :param initial_backoff: seconds before the second try; doubles each time, up to ``max_backoff``.
    :param max_backoff: cap of one wait, in seconds.
    """

    attempts: int = 3
    initial_backoff: float = 1.0
    max_backoff: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, got {self.attempts}")

    def run(self, fn: Callable[[], T], *, before_sleep: Callable[[RetryCallState], None] | None = None) -> T:
        """``fn()`` until it returns; the last error is re-raised as is when the tries run out."""
        retrying = Retrying(
            stop=stop_after_attempt(self.attempts),
            # Jitter spreads the retries of parallel runs so they do not hit a recovering server together.
            wait=wait_exponential_jitter(
                initial=self.initial_backoff, max=self.max_backoff, jitter=self.initial_backoff
            ),
            retry=retry_if_exception(is_retryable),
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(fn)


class GrpcCacheHook(GrpcServiceHook):
    """Calls ``CacheService.InvalidateCache`` on the API server.

    :param grpc_conn_id: an ``embedding_cache_grpc`` connection to the API server (the same fields
        as ``embedding_grpc``, see :class:`GrpcServiceHook`; a connection of that type works too);
        its ``timeout`` is the default deadline of a call.
    """

    default_conn_name = "cache_grpc_default"
    # Its own type, so that the connection form's Test asks the server about CacheService.
    conn_type = "embedding_cache_grpc"
    hook_name = "Embedding cache invalidation gRPC"
    default_port = DEFAULT_PORT
    service_name = CACHE_SERVICE

    def invalidate(self, target: str, *, timeout: float | None = None) -> None:
        """One ``InvalidateCache(target)`` call; :class:`CacheInvalidationError` unless it answers success.

        :param timeout: the call's deadline in seconds; the connection's ``timeout`` when ``None``.
        """
        deadline = self.settings.timeout if timeout is None else timeout
        where = f"InvalidateCache({target!r}) at {self.settings.target} (connection {self.grpc_conn_id!r})"
        stub = embedding_pb2_grpc.CacheServiceStub(self.channel)
        try:
            reply = stub.InvalidateCache(
                embedding_pb2.CacheInvalidateRequest(target=target),
                timeout=deadline,
                metadata=self.settings.metadata(),
            )
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                detail = f"no answer within the {deadline:g} s deadline"
            else:
                detail = exc.details() or "no details"
            retryable = code in RETRYABLE_CODES
            hint = "" if retryable else "; not retried: the request or the configuration must be fixed first"
            raise CacheInvalidationError(
                f"{where} failed with {code.name}: {detail}{hint}", retryable=retryable, code=code
            ) from None
        if not reply.success:
            raise CacheInvalidationError(f"{where} answered success=false: the server did not drop it", retryable=True)
