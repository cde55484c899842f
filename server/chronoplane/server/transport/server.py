"""The grpc.aio server: SchedulerService, health checking and reflection."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection
from grpc_reflection.v1alpha import reflection_pb2

from chronoplane.server import tracing
from chronoplane.server.security import Authenticator
from chronoplane.server.service import SchedulerService
from chronoplane.server.transport.audit import AuditInterceptor
from chronoplane.server.transport.auth import AuthInterceptor
from chronoplane.server.transport.errors import DecodeInterceptor, ErrorInterceptor
from chronoplane.server.transport.metrics import MetricsInterceptor
from chronoplane.server.transport.servicer import SchedulerServicer
from chronoplane.v1 import scheduler_service_pb2, scheduler_service_pb2_grpc

__all__ = ["SERVICE_NAME", "GrpcServer", "Limits", "TlsFiles"]

SERVICE_NAME = scheduler_service_pb2.DESCRIPTOR.services_by_name["SchedulerService"].full_name
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class Limits:
    """What the transport enforces itself (grpc answers RESOURCE_EXHAUSTED past each)."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_concurrent_rpcs: int = 4000
    # Keepalive: the server pings idle connections every keepalive_time and drops one that
    # does not answer within keepalive_timeout; a client pinging more often than every
    # min_ping_interval (without data) is told to go away after two strikes.
    keepalive_time: float = 60.0
    keepalive_timeout: float = 20.0
    min_ping_interval: float = 10.0

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.min_ping_interval * 1000)),
            ("grpc.http2.max_ping_strikes", 2),
        ]


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _fill_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    for message in messages:
        for field in message.field:
            field.json_name = field.json_name or _json_name(field.name)
        _fill_json_names(message.nested_type)


def reflection_pool(files: Iterable[FileDescriptor]) -> descriptor_pool.DescriptorPool:
    """The descriptors served by reflection, with json_name set on every field.

    Python's generated code drops json_name from its descriptors, and grpcurl then prints
    proto field names (job_id) instead of the proto3 JSON names (jobId) every other client
    uses; serving the names restores the standard mapping.
    """
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        _fill_json_names(proto.message_type)
        pool.Add(proto)
        added.add(file.name)

    for file in files:
        add(file)
    return pool


@dataclass(frozen=True, kw_only=True)
class TlsFiles:
    """PEM files: the server's certificate and key, and the CA of client certificates
    (mTLS: when given, a client must present a certificate it signed)."""

    cert: str
    key: str
    client_ca: str = ""

    def credentials(self) -> Any:
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


class GrpcServer:
    """Owns the grpc.aio server and its health status."""

    def __init__(
        self,
        service: SchedulerService,
        address: str,
        *,
        tls: TlsFiles | None = None,
        authenticator: Authenticator | None = None,
        reflection: str = "on",
        limits: Limits | None = None,
        audit: AuditInterceptor | None = None,
        traced: bool = False,
        metrics: bool = False,
    ) -> None:
        limits = limits or Limits()
        # Outermost first: a call's span covers all of it; the metrics and the audit log see
        # how every call ended, refusals included.
        interceptors: list[Any] = [tracing.grpc_interceptor()] if traced else []
        if metrics:
            interceptors.append(MetricsInterceptor())
        interceptors.append(DecodeInterceptor())
        if audit is not None:
            interceptors.append(audit)
        interceptors.append(ErrorInterceptor())
        if authenticator is not None:
            interceptors.append(AuthInterceptor(authenticator, reflection=reflection))
        self._server = grpc.aio.server(
            interceptors=interceptors,
            options=limits.options(),
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        scheduler_service_pb2_grpc.add_SchedulerServiceServicer_to_server(
            SchedulerServicer(service), self._server
        )
        self._health = health.aio.HealthServicer()
        self._serving = True
        self._stopping = False
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        if reflection != "off":
            grpc_reflection.enable_server_reflection(
                [SERVICE_NAME, health.SERVICE_NAME, grpc_reflection.SERVICE_NAME],
                self._server,
                pool=reflection_pool(
                    [
                        scheduler_service_pb2.DESCRIPTOR,
                        health_pb2.DESCRIPTOR,
                        reflection_pb2.DESCRIPTOR,
                        # So that grpcurl can print the google.rpc details of errors.
                        error_details_pb2.DESCRIPTOR,
                    ]
                ),
            )
        if tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, tls.credentials())
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self.address = f"{address.rpartition(':')[0]}:{self.port}"

    async def start(self) -> None:
        await self._server.start()
        await self._set_health(serving=True)

    async def serving(self, ok: bool) -> None:
        """Health says SERVING while the instance reaches its database, NOT_SERVING while it
        does not (told after each heartbeat)."""
        if ok != self._serving and not self._stopping:
            self._serving = ok
            await self._set_health(serving=ok)

    async def _set_health(self, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Health says NOT_SERVING, new RPCs are refused, in-flight ones get ``grace``."""
        self._stopping = True
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
