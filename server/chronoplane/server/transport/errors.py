"""The one table from domain errors to gRPC status, applied by one server interceptor.

Unexpected exceptions become INTERNAL with an error id; the traceback goes to the log under
that id, never onto the wire.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from chronoplane.server.errors import (
    AlreadyExists,
    CancellationPending,
    ChronoplaneError,
    CursorOutOfRange,
    EtagMismatch,
    FailedPrecondition,
    FieldViolation,
    InstanceConflict,
    InvalidArgument,
    NotFound,
    NotLeader,
    PermissionDenied,
    ResourceExhausted,
    ServerStopping,
    StorageConflict,
    StorageUnavailable,
    Unauthenticated,
)

__all__ = [
    "DOMAIN",
    "DecodeInterceptor",
    "ErrorInterceptor",
    "PerMethod",
    "end_with",
    "nul_fields",
    "status_for",
]

log = logging.getLogger(__name__)

DOMAIN = "chronoplane.dev"
HEALTH_PREFIX = "/grpc.health.v1.Health/"

_TABLE: list[tuple[type[ChronoplaneError], grpc.StatusCode]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    (EtagMismatch, grpc.StatusCode.ABORTED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (InstanceConflict, grpc.StatusCode.FAILED_PRECONDITION),
    (StorageUnavailable, grpc.StatusCode.UNAVAILABLE),
    (StorageConflict, grpc.StatusCode.ABORTED),
    (CancellationPending, grpc.StatusCode.UNAVAILABLE),
    (ServerStopping, grpc.StatusCode.UNAVAILABLE),
    (NotLeader, grpc.StatusCode.UNAVAILABLE),
    (CursorOutOfRange, grpc.StatusCode.OUT_OF_RANGE),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
]


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_for(error: ChronoplaneError) -> grpc.Status:
    code = next(
        (code for kind, code in _TABLE if isinstance(error, kind)), grpc.StatusCode.INTERNAL
    )
    details = [
        _pack(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=DOMAIN, metadata=error.metadata)
        )
    ]
    if isinstance(error, InvalidArgument):
        details.insert(
            0,
            _pack(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(
                            field=v.field, description=v.description
                        )
                        for v in error.violations
                    ]
                )
            ),
        )
    status = status_pb2.Status(code=code.value[0], message=str(error), details=details)
    return rpc_status.to_status(status)


def _internal(error_id: str) -> grpc.Status:
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal error {error_id}; the server log has the details",
        details=[
            _pack(
                error_details_pb2.ErrorInfo(
                    reason="INTERNAL", domain=DOMAIN, metadata={"error_id": error_id}
                )
            )
        ],
    )
    return rpc_status.to_status(status)


def _status_of(error: Exception) -> grpc.Status:
    """The status an error ends its call with; an unexpected one is logged under an id."""
    if isinstance(error, ChronoplaneError):
        return status_for(error)
    error_id = secrets.token_hex(8)
    log.error("internal error %s", error_id, exc_info=error)
    return _internal(error_id)


def end_with(context: Any, status: grpc.Status) -> None:
    """Ends the call with ``status`` once its handler returns (grpc sends no message with a
    status that is not OK). Not ``abort_with_status``: the AbortError it raises would hold,
    through its traceback's frames, the request (4 MiB, say) in a reference cycle that only a
    full garbage collection frees, for every refused call."""
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


Behaviour = Callable[[Any, Any], Awaitable[Any]]


def nul_fields(message: Any, prefix: str = "") -> list[str]:
    """The paths of the string fields (at any depth, map keys too) that hold a NUL byte:
    PostgreSQL cannot store one, so they are refused before anything reaches the database."""
    found: list[str] = []
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.type == field.TYPE_STRING:
            values = value if field.is_repeated else [value]
            found += [path for v in values if "\x00" in v][:1]
        elif field.type == field.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if "\x00" in str(key):
                        found.append(f"{path}[{key!r}]")
                    elif hasattr(item, "ListFields"):
                        found += nul_fields(item, f"{path}[{key!r}].")
                    elif isinstance(item, str) and "\x00" in item:
                        found.append(f"{path}[{key!r}]")
            elif field.is_repeated:
                for n, item in enumerate(value):
                    found += nul_fields(item, f"{path}[{n}].")
            else:
                found += nul_fields(value, f"{path}.")
    return found


def _check_nul(request: Any) -> None:
    paths = nul_fields(request) if hasattr(request, "ListFields") else []
    if paths:
        raise InvalidArgument(
            [FieldViolation(field=path, description="contains a NUL character") for path in paths]
        )


def _guard_unary(behaviour: Behaviour) -> Behaviour:
    async def guarded(request: Any, context: Any) -> Any:
        try:
            _check_nul(request)
            return await behaviour(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            # Only the status leaves this block: the error, its traceback and their frames
            # (the request among their locals) are freed as it ends.
            status = _status_of(error)
        end_with(context, status)
        return None

    return guarded


def _chronoplane(handler: Any, method: str) -> bool:
    """Whether the handler serves a Chronoplane RPC (not health or reflection), which these
    interceptors guard. All are unary or server-streaming; a client-streaming one would need
    its own guard and decoder first."""
    if handler is None or not method.startswith("/chronoplane."):
        return False
    if handler.request_streaming:
        raise NotImplementedError("client-streaming Chronoplane RPCs need a guard")
    return True


class PerMethod:
    """An interceptor's wrapped handlers, made once per method and reused: grpc asks every
    interceptor for the handler of every call, and the wrapping is the same each time (the
    handlers of a method, and their wrappers, keep no state of a call)."""

    def __init__(self) -> None:
        self._made: dict[str, tuple[Any, Any]] = {}

    def get(self, method: str, handler: Any, make: Callable[[], Any]) -> Any:
        made = self._made.get(method)
        if made is None or made[0] is not handler:
            made = self._made[method] = (handler, make())
        return made[1]


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Applies the table to every Chronoplane RPC."""

    def __init__(self) -> None:
        self._wrapped = PerMethod()

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if not _chronoplane(handler, method):
            return handler
        # Server-streaming handlers write with context.write and return: one guard fits both.
        return self._wrapped.get(
            method,
            handler,
            lambda: grpc.experimental.wrap_server_method_handler(_guard_unary, handler),
        )


class DecodeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Parses Chronoplane and health-checking requests itself, outermost, so that one grpc
    cannot parse (invalid UTF-8 in a string field, a corrupt wire format) is INVALID_ARGUMENT
    naming the message, not grpc's UNKNOWN, and never reaches a handler. Its streams send
    bytes as they are: a watch event is encoded once for all the streams it goes to."""

    def __init__(self) -> None:
        self._wrapped = PerMethod()

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        health = handler is not None and method.startswith(HEALTH_PREFIX)
        if not health and not _chronoplane(handler, method):
            return handler
        return self._wrapped.get(method, handler, lambda: _decoding(handler))


def _decoding(handler: Any) -> Any:
    """``handler``, taking the request's bytes and parsing them itself."""
    parse = handler.request_deserializer
    inner = handler.unary_stream if handler.response_streaming else handler.unary_unary

    async def decoded(raw: bytes, context: Any) -> Any:
        try:
            request = parse(raw)
        except Exception as error:  # DecodeError, and whatever a parser may raise
            violation = FieldViolation(
                field="request",
                description=f"cannot be parsed ({error}); string fields must be UTF-8",
            )
            status = status_for(InvalidArgument([violation]))
        else:
            return await inner(request, context)
        end_with(context, status)
        return None

    if not handler.response_streaming:
        return grpc.unary_unary_rpc_method_handler(
            decoded, request_deserializer=None, response_serializer=handler.response_serializer
        )
    serialize = handler.response_serializer

    def serialized_once(message: Any) -> bytes:
        # A watch event goes to many streams encoded once: the servicer writes its bytes.
        return message if isinstance(message, bytes) else serialize(message)

    return grpc.unary_stream_rpc_method_handler(
        decoded, request_deserializer=None, response_serializer=serialized_once
    )
