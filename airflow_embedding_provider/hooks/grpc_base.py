"""``GrpcServiceHook``: what the provider's gRPC hooks share — the channel from an
``embedding_grpc`` connection, readiness, health checking and ``test_connection``."""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar

import grpc
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from grpc_health.v1 import health_pb2, health_pb2_grpc

from airflow_embedding_provider.hooks.grpc_channel import ChannelSettings
from airflow_embedding_provider.wire.contract import AI_SERVER_PORT


class GrpcServiceHook(BaseHook):
    """A hook on one gRPC service of an ``embedding_grpc`` connection.

    :param grpc_conn_id: an ``embedding_grpc`` connection: host, port and the extras ``use_tls``,
        ``ca_cert``, ``client_cert``, ``client_key``, ``tls_server_name``, ``token`` and ``timeout``
        (seconds: the deadline of unary calls and of waiting for the server).
    """

    conn_name_attr = "grpc_conn_id"
    default_conn_name = ""
    conn_type = "embedding_grpc"
    hook_name = "Embedding gRPC"
    #: the port when the connection names none, and the service health checks ask about
    default_port: ClassVar[int] = AI_SERVER_PORT
    service_name: ClassVar[str] = ""

    def __init__(self, grpc_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.grpc_conn_id = grpc_conn_id or self.default_conn_name
        self.closed = False

    @cached_property
    def settings(self) -> ChannelSettings:
        return ChannelSettings.from_connection(self.get_connection(self.grpc_conn_id), default_port=self.default_port)

    @cached_property
    def channel(self) -> grpc.Channel:
        self.closed = False
        return self.settings.open_channel()

    def get_conn(self) -> grpc.Channel:
        return self.channel

    def close(self) -> None:
        """Close the channel; calls in flight end with CANCELLED, which is then not a reason to
        reconnect (``closed`` says so)."""
        self.closed = True
        if "channel" in self.__dict__:
            self.__dict__.pop("channel").close()

    def wait_until_ready(self) -> None:
        """Block until the server answers; ``ConnectionError`` after the connection's timeout.

        A health check that waits for the connection, rather than ``channel_ready_future``, whose
        polling thread outlives it and fails noisily once the channel is closed. Any answer counts,
        UNIMPLEMENTED included: a server without health checking is still there.
        """
        try:
            health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=self.settings.timeout,
                metadata=self.settings.metadata(),
                wait_for_ready=True,
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                detail = exc.details() if isinstance(exc, grpc.Call) else ""
                raise ConnectionError(
                    f"no gRPC server answered at {self.settings.target} within "
                    f"{self.settings.timeout:g} s (connection {self.grpc_conn_id!r})"
                    + (f": {detail}" if detail and code == grpc.StatusCode.UNAVAILABLE else "")
                ) from None

    def health(self, service: str | None = None) -> str:
        """The server's health status name for ``service`` (this hook's by default)."""
        reply = health_pb2_grpc.HealthStub(self.channel).Check(
            health_pb2.HealthCheckRequest(service=self.service_name if service is None else service),
            timeout=self.settings.timeout,
            metadata=self.settings.metadata(),
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    def test_connection(self) -> tuple[bool, str]:
        """Used by the connection form's Test button: asks the server's health service about this
        hook's service, so each connection type tests what its server must serve."""
        try:
            status = self.health()
        except AirflowNotFoundException as exc:
            return False, f"{exc}: create the connection {self.grpc_conn_id!r} first"
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                # The health service answered, but knows no such service: another kind of server.
                return False, (
                    f"{self.settings.target} answers but does not serve {self.service_name} (NOT_FOUND): "
                    f"is it the right server, and the connection of the right type ({self.conn_type!r} is "
                    "for that service)?"
                )
            return False, f"{self.settings.target}: {exc.code().name}: {exc.details()}"
        except (ValueError, OSError) as exc:
            return False, str(exc)
        finally:
            self.close()
        return status == "SERVING", f"{self.settings.target}: {status}"
