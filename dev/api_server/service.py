"""``CacheService`` as an API team would implement it, plus fault injection for tests and the demo.

The server keeps query results in an in-memory :class:`QueryCache`; ``InvalidateCache(target)``
drops the target's entries so that the next queries rebuild them from PostgreSQL (docs/design.md §7.4).
Invalidation is idempotent, so the batch side may deliver the same request twice.

Counters (calls, successes, ...) are written as JSON to ``stats_file`` after every call: the proto
has no room for a stats RPC, and a file is readable from another process without a client.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from airflow_embedding_provider.grpc_server import add_health, bind_port, new_server, wait_for_stop_signal
from airflow_embedding_provider.security import ServerSecurity
from airflow_embedding_provider.wire import embedding_pb2, embedding_pb2_grpc
from airflow_embedding_provider.wire.contract import CACHE_SERVICE

log = logging.getLogger(__name__)

SERVICE_NAME = CACHE_SERVICE
#: ``--fail-code`` value that answers ``success=false`` (status OK) instead of a gRPC error.
SUCCESS_FALSE = "SUCCESS_FALSE"


@dataclass(frozen=True)
class FaultPlan:
    """Failures and delays injected on purpose; call numbers count from 1.

    :param fail_first: the first N calls fail.
    :param fail_always: every call fails.
    :param fail_code: how a call fails: a ``grpc.StatusCode`` name, or ``SUCCESS_FALSE``.
    :param delay: seconds a call waits before it answers (cut short when the client gives up).
    :param delay_first: only the first N calls wait; 0 = every call.
    """

    fail_first: int = 0
    fail_always: bool = False
    fail_code: str = "UNAVAILABLE"
    delay: float = 0.0
    delay_first: int = 0

    def __post_init__(self) -> None:
        if self.fail_code != SUCCESS_FALSE and self.fail_code not in grpc.StatusCode.__members__:
            raise ValueError(f"fail_code {self.fail_code!r} is neither a gRPC status code name nor {SUCCESS_FALSE}")
        if self.fail_code == "OK":
            raise ValueError("fail_code OK would not fail")
        if self.fail_first < 0 or self.delay < 0 or self.delay_first < 0:
            raise ValueError("fail_first, delay and delay_first must not be negative")

    def fails(self, call: int) -> bool:
        return self.fail_always or call <= self.fail_first

    def delay_for(self, call: int) -> float:
        return self.delay if self.delay_first == 0 or call <= self.delay_first else 0.0


class QueryCache:
    """Query results by target, as an API server would hold them (Redis or Caffeine in the design)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] = {}

    def get_or_load(self, target: str, key: str, load: Callable[[], Any]) -> Any:
        with self._lock:
            bucket = self._entries.setdefault(target, {})
            if key not in bucket:
                bucket[key] = load()
            return bucket[key]

    def invalidate(self, target: str) -> int:
        """Drop every entry of ``target``; how many went. Dropping nothing is fine (idempotent)."""
        with self._lock:
            return len(self._entries.pop(target, {}))

    def size(self, target: str) -> int:
        with self._lock:
            return len(self._entries.get(target, {}))


@dataclass
class Stats:
    """What the server saw. ``abandoned`` calls were still waiting (``delay``) when the client gave up."""

    calls: int = 0
    successes: int = 0
    failures: int = 0
    abandoned: int = 0
    invalidations: dict[str, int] = field(default_factory=dict)
    dropped_entries: int = 0


class CacheServicer(embedding_pb2_grpc.CacheServiceServicer):
    """``InvalidateCache``: drop the target's cache entries, count, and inject the planned faults."""

    def __init__(
        self, cache: QueryCache | None = None, *, faults: FaultPlan | None = None, stats_file: Path | None = None
    ) -> None:
        self.cache = cache or QueryCache()
        self.faults = faults or FaultPlan()
        self.stats_file = stats_file
        self._stats = Stats()
        self._lock = threading.Lock()
        self._write_stats()

    def stats(self) -> Stats:
        with self._lock:
            return Stats(**asdict(self._stats))

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + delta)
            self._write_stats()

    def _write_stats(self) -> None:
        if self.stats_file is None:
            return
        # Replace, never rewrite in place: a reader sees the old or the new file, never half of one.
        tmp = self.stats_file.with_name(self.stats_file.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self._stats), sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.stats_file)

    def InvalidateCache(  # noqa: N802 - gRPC method name
        self, request: embedding_pb2.CacheInvalidateRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.CacheInvalidateResponse:
        with self._lock:
            self._stats.calls += 1
            call = self._stats.calls
        target = request.target
        delay = self.faults.delay_for(call)
        if delay:
            finished = threading.Event()
            context.add_callback(finished.set)  # runs when the client cancels or its deadline passes
            if finished.wait(delay) or not context.is_active():
                log.info(
                    "InvalidateCache call=%d target=%r: the client gave up during a %g s delay", call, target, delay
                )
                self._count(abandoned=1)
                return embedding_pb2.CacheInvalidateResponse(success=False)
        if not target:
            self._count(failures=1)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target is empty: name the cache to drop, e.g. 'recruit'")
        if self.faults.fails(call):
            self._count(failures=1)
            log.info(
                "InvalidateCache call=%d target=%r: failing on purpose with %s", call, target, self.faults.fail_code
            )
            if self.faults.fail_code == SUCCESS_FALSE:
                return embedding_pb2.CacheInvalidateResponse(success=False)
            context.abort(grpc.StatusCode[self.faults.fail_code], f"injected failure of call {call}")
        dropped = self.cache.invalidate(target)
        with self._lock:
            self._stats.successes += 1
            self._stats.invalidations[target] = self._stats.invalidations.get(target, 0) + 1
            self._stats.dropped_entries += dropped
            self._write_stats()
        log.info("InvalidateCache call=%d target=%r: dropped %d entries", call, target, dropped)
        return embedding_pb2.CacheInvalidateResponse(success=True)


def read_stats(path: Path) -> Stats:
    """The counters a server wrote to ``--stats-file``."""
    return Stats(**json.loads(Path(path).read_text(encoding="utf-8")))


def build_server(
    servicer: CacheServicer,
    *,
    host: str,
    port: int,
    max_workers: int = 16,
    security: ServerSecurity | None = None,
) -> tuple[grpc.Server, int]:
    """A not yet started server bound to ``host:port`` (0 = a free port); returns it and the port.

    :param security: TLS, mutual TLS and bearer-token settings; ``None`` serves plaintext without a token.
    """
    server = new_server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="api-server"), security=security
    )
    embedding_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)
    # Injected faults concern the RPC only: the server stays SERVING, like a live server whose backend fails.
    add_health(server, SERVICE_NAME)
    return server, bind_port(server, host, port, security)


def serve(servicer: CacheServicer, *, host: str, port: int, security: ServerSecurity | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then finish in-flight calls for up to 5 s.

    :param security: TLS, mutual TLS and bearer-token settings; ``None`` serves plaintext without a token.
    """
    server, bound = build_server(servicer, host=host, port=port, security=security)
    server.start()
    print(f"API server listening on {host}:{bound} ({SERVICE_NAME}, faults: {servicer.faults})", flush=True)
    log.info("transport: %s", (security or ServerSecurity()).describe())
    wait_for_stop_signal()
    log.info("shutting down")
    server.stop(grace=5).wait()
