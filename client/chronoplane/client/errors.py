"""Typed errors: every failed call raises one, chosen by the gRPC status code.

ChronoplaneError                      any failed call; .code, .message, .reason
├── InvalidArgument (ValueError)      a bad request; .field_violations names each bad field
├── NotFound (LookupError)            the job or execution does not exist
├── AlreadyExists                     the job id is taken
├── Aborted                           the etag did not match (reason ETAG_MISMATCH), or the
│                                     database rolled the call back (STORAGE_CONFLICT): retry
├── FailedPrecondition                the state of things forbids the call: .reason is
│                                     TASK_NOT_REGISTERED or EXECUTION_FINISHED
├── Unavailable (ConnectionError)     the server, or its database, cannot be reached
├── DeadlineExceeded (TimeoutError)   no answer within the timeout
├── Unimplemented                     the server does not know the call (older version)
└── Internal                          the server failed; its log has the details

A status code with no class of its own (UNKNOWN, RESOURCE_EXHAUSTED, ...) raises
ChronoplaneError itself, with ``.code`` telling which.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "Aborted",
    "AlreadyExists",
    "ChronoplaneError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Unavailable",
    "Unimplemented",
    "error_info",
    "from_rpc_error",
]


class ChronoplaneError(Exception):
    """Raised when a call fails; the root of every error this client raises.

    ``code`` is the gRPC status code, ``message`` the server's human-readable message and
    ``reason`` its machine-readable one (google.rpc.ErrorInfo, for example "JOB_NOT_FOUND"),
    empty when the error did not come from a Chronoplane server.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, reason: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        if code is not None:
            self.code = code


class InvalidArgument(ChronoplaneError, ValueError):
    """Raised when the request is wrong; ``field_violations`` maps each bad field to why."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        field_violations: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, reason=reason)
        self.field_violations = dict(field_violations or {})


class NotFound(ChronoplaneError, LookupError):
    """Raised when the job or execution named in the call does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ChronoplaneError):
    """Raised when a job is created with an id that is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(ChronoplaneError):
    """Raised when the call was aborted. ``reason`` tells why: "ETAG_MISMATCH" (the job
    changed since it was read: read it again) or "STORAGE_CONFLICT" (the database rolled the
    call back because of another one; nothing was written, calling again is safe)."""

    code = grpc.StatusCode.ABORTED


class FailedPrecondition(ChronoplaneError):
    """Raised when the state of things forbids the call. ``reason`` tells which:
    "TASK_NOT_REGISTERED" (the job's task is not registered on the server) or
    "EXECUTION_FINISHED" (CancelExecution of an execution already in a final state).
    """

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ChronoplaneError, ConnectionError):
    """Raised when the server, or its database, cannot be reached; retrying later may help."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ChronoplaneError, TimeoutError):
    """Raised when no answer came within the timeout; the call may still have taken effect."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unimplemented(ChronoplaneError):
    """Raised when the server does not implement the call, e.g. an older server version."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ChronoplaneError):
    """Raised when the server failed; the message carries an error id to find in its log."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ChronoplaneError]] = {
    kind.code: kind
    for kind in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Aborted,
        FailedPrecondition,
        Unavailable,
        DeadlineExceeded,
        Unimplemented,
        Internal,
    )
}


def _rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except ValueError:  # details that contradict the status: trust the status, drop them
        return None
    return status


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail a failed call carries (reason and metadata), if any."""
    status = _rich_status(error)
    info = error_details_pb2.ErrorInfo()
    if status is not None and any(detail.Unpack(info) for detail in status.details):
        return info
    return None


def _reason(status: status_pb2.Status) -> str:
    info = error_details_pb2.ErrorInfo()
    return next((info.reason for detail in status.details if detail.Unpack(info)), "")


def _field_violations(status: status_pb2.Status) -> dict[str, str]:
    found: dict[str, str] = {}
    bad = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Unpack(bad):
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def from_rpc_error(error: grpc.aio.AioRpcError) -> ChronoplaneError:
    """The typed error for a failed call, with the details the server attached."""
    code = error.code()
    message = error.details() or code.name
    status = _rich_status(error)
    reason = _reason(status) if status else ""
    kind = _BY_CODE.get(code, ChronoplaneError)
    if kind is InvalidArgument:
        violations = _field_violations(status) if status else {}
        return InvalidArgument(message, reason=reason, field_violations=violations)
    return kind(message, code=code, reason=reason)
