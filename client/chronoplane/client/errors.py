"""Typed errors: every failed call raises one, chosen by the gRPC status code.

ChronoplaneError                      any failed call; .code, .message, .reason, .metadata
├── InvalidArgument (ValueError)      a bad request; .field_violations names each bad field
├── NotFound (LookupError)            the job or execution does not exist
├── AlreadyExists                     the job id is taken
├── Aborted                           the etag did not match (reason ETAG_MISMATCH), or the
│                                     database rolled the call back (STORAGE_CONFLICT): retry
├── FailedPrecondition                the state of things forbids the call: .reason is
│                                     TASK_NOT_REGISTERED or EXECUTION_FINISHED
├── OutOfRange (IndexError)           a watch's after_cursor is outside the kept history;
│                                     .oldest_cursor and .newest_cursor say what is kept
├── ResourceExhausted                 a limit was reached: .limit names the setting
│                                     (max_watchers, watch_buffer: .cursor to resume after)
├── Unauthenticated (PermissionError) no token, or one the server does not know
├── PermissionDenied (PermissionError) the token's role may not make the call
├── Unavailable (ConnectionError)     the server, or its database, cannot be reached; reason
│                                     TLS_MISMATCH when one side spoke TLS and the other not
├── DeadlineExceeded (TimeoutError)   no answer within the timeout
├── Cancelled                         the call was cancelled (the channel was closed)
├── Unimplemented                     the server does not know the call (older version)
└── Internal                          the server failed; its log has the details

``.metadata`` is the ErrorInfo's metadata the server attached (for example the error id of
an INTERNAL error). A status code with no class of its own (UNKNOWN, DATA_LOSS) raises
ChronoplaneError itself, with ``.code`` telling which.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ChronoplaneError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_info",
    "from_rpc_error",
]


class ChronoplaneError(Exception):
    """Raised when a call fails; the root of every error this client raises.

    ``code`` is the gRPC status code, ``message`` the server's human-readable message and
    ``reason`` its machine-readable one (google.rpc.ErrorInfo, for example "JOB_NOT_FOUND"),
    empty when the error did not come from a Chronoplane server; ``metadata`` is the
    ErrorInfo's metadata.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.metadata = dict(metadata or {})
        if code is not None:
            self.code = code

    def _cursor(self, key: str) -> int | None:
        text = self.metadata.get(key, "")
        return int(text) if text.lstrip("-").isdigit() else None


class InvalidArgument(ChronoplaneError, ValueError):
    """Raised when the request is wrong; ``field_violations`` maps each bad field to why."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, reason=reason, metadata=metadata)
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


class OutOfRange(ChronoplaneError, IndexError):
    """Raised when a watch's ``after_cursor`` is outside the event history the server keeps;
    resume from ``oldest_cursor`` or ``newest_cursor``, or start again with a snapshot."""

    code = grpc.StatusCode.OUT_OF_RANGE

    @property
    def oldest_cursor(self) -> int | None:
        return self._cursor("oldest_cursor")

    @property
    def newest_cursor(self) -> int | None:
        return self._cursor("newest_cursor")


class ResourceExhausted(ChronoplaneError):
    """Raised when a limit of the server was reached; ``limit`` names its setting
    ("max_watchers", "watch_buffer"; empty for grpc's own, such as the message size).
    A watch that fell behind (reason WATCH_FELL_BEHIND) resumes after ``cursor``."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    @property
    def limit(self) -> str:
        return self.metadata.get("limit", "")

    @property
    def cursor(self) -> int | None:
        return self._cursor("cursor")


class Unauthenticated(ChronoplaneError, PermissionError):
    """Raised when the call has no token, or one the server does not know (or has revoked)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ChronoplaneError, PermissionError):
    """Raised when the caller's role may not make the call; the message names the role."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(ChronoplaneError):
    """Raised when the call was cancelled before it ended, e.g. by closing the client."""

    code = grpc.StatusCode.CANCELLED


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
        OutOfRange,
        ResourceExhausted,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
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


def _field_violations(status: status_pb2.Status) -> dict[str, str]:
    found: dict[str, str] = {}
    bad = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Unpack(bad):
            found.update({v.field: v.description for v in bad.field_violations})
    return found


# What grpc says when one side of a connection spoke TLS and the other did not.
_PLAINTEXT_TO_TLS = ("Socket closed", "Connection reset by peer")
_TLS_TO_PLAINTEXT = ("WRONG_VERSION_NUMBER", "handshake failed", "Handshake failed")


def _tls_mismatch(details: str, tls: bool | None) -> str:
    """Why the connection failed, when it looks like a TLS/plaintext mismatch; else ""."""
    if tls is False and any(sign in details for sign in _PLAINTEXT_TO_TLS):
        return (
            "the server closed the connection as it opened: if it serves TLS, connect with "
            "TLS (tls=True or tls_ca=...; chronoctl: CHRONOPLANE_TLS_CA)"
        )
    if tls and any(sign in details for sign in _TLS_TO_PLAINTEXT):
        return (
            "the TLS handshake failed: if the server speaks plaintext (started without "
            "tls_cert), connect without TLS; otherwise check its certificate and tls_ca"
        )
    return ""


def from_rpc_error(error: grpc.aio.AioRpcError, *, tls: bool | None = None) -> ChronoplaneError:
    """The typed error for a failed call, with the details the server attached.

    ``tls`` says whether the channel was TLS, to explain an UNAVAILABLE that comes from
    talking TLS to a plaintext port, or plaintext to a TLS one.
    """
    code = error.code()
    message = error.details() or code.name
    status = _rich_status(error)
    info = error_info(error) or error_details_pb2.ErrorInfo()
    reason, metadata = info.reason, dict(info.metadata)
    if code == grpc.StatusCode.UNAVAILABLE and not reason:
        why = _tls_mismatch(message, tls)
        if why:
            message, reason = f"{message}: {why}", "TLS_MISMATCH"
    kind = _BY_CODE.get(code, ChronoplaneError)
    if kind is InvalidArgument:
        violations = _field_violations(status) if status else {}
        return InvalidArgument(
            message, reason=reason, metadata=metadata, field_violations=violations
        )
    return kind(message, code=code, reason=reason, metadata=metadata)
