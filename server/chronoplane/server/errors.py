"""Domain exceptions. No gRPC here: transport/errors.py maps them to status codes.

ChronoplaneError
├── InvalidArgument (ValueError)        one or more bad fields, each named
├── NotFound (LookupError)
│   ├── JobNotFound
│   └── ExecutionNotFound
├── AlreadyExists
│   └── JobAlreadyExists
├── EtagMismatch                        optimistic concurrency lost
├── FailedPrecondition                  the state of things forbids the call
│   ├── TaskNotRegistered
│   └── CeleryNotEnabled                a Celery job on a server without a broker
├── StorageUnavailable (ConnectionError) the database cannot be reached (retry later)
├── StorageConflict                     a transaction lost to another (deadlock, lock timeout,
│                                       serialization failure) and was rolled back (retry)
├── CancellationPending (TimeoutError)  the instance running it has not stopped it yet
├── ServerStopping                      a stream ended because this server shuts down
├── InstanceConflict                    another server already uses this database
├── NotLeader                           a leader's write after it lost leadership (fenced)
├── CursorOutOfRange                    a watch cursor outside the kept event history
├── Unauthenticated                     no credentials, or bad ones, where they are required
├── PermissionDenied                    the caller's role may not make this call
└── ResourceExhausted                   a limit reached
    ├── TooManyWatchers
    └── WatchFellBehind                 a watcher that did not keep up with its buffer
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AlreadyExists",
    "CancellationPending",
    "CeleryNotEnabled",
    "ChronoplaneError",
    "CursorOutOfRange",
    "EtagMismatch",
    "ExecutionFinished",
    "ExecutionNotFound",
    "FailedPrecondition",
    "FieldViolation",
    "InstanceConflict",
    "InvalidArgument",
    "JobAlreadyExists",
    "JobNotFound",
    "NotFound",
    "NotLeader",
    "PermissionDenied",
    "ResourceExhausted",
    "ServerStopping",
    "StorageConflict",
    "StorageUnavailable",
    "TaskNotRegistered",
    "TooManyWatchers",
    "Unauthenticated",
    "WatchFellBehind",
]


class ChronoplaneError(Exception):
    """Root of every error the server raises on purpose."""

    reason = "CHRONOPLANE_ERROR"
    # Machine-readable facts for the client (the ErrorInfo metadata on the wire).
    metadata: dict[str, str] = {}  # noqa: RUF012 - replaced per instance, never mutated


@dataclass(frozen=True, kw_only=True)
class FieldViolation:
    """One bad field: its path in the request (``job.trigger.cron.expression``) and why."""

    field: str
    description: str


class InvalidArgument(ChronoplaneError, ValueError):
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))

    @classmethod
    def field(cls, field: str, description: str) -> InvalidArgument:
        return cls([FieldViolation(field=field, description=description)])


class NotFound(ChronoplaneError, LookupError):
    reason = "NOT_FOUND"


class JobNotFound(NotFound):
    reason = "JOB_NOT_FOUND"

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} not found")


class ExecutionNotFound(NotFound):
    reason = "EXECUTION_NOT_FOUND"

    def __init__(self, execution_id: str) -> None:
        self.execution_id = execution_id
        super().__init__(f"execution {execution_id!r} not found")


class AlreadyExists(ChronoplaneError):
    reason = "ALREADY_EXISTS"


class JobAlreadyExists(AlreadyExists):
    reason = "JOB_ALREADY_EXISTS"

    def __init__(self, job_id: str, *, field: str = "") -> None:
        """``field`` names where the request gave the id (``requests[3].job.id`` in a batch)."""
        self.job_id = job_id
        where = f"{field}: " if field else ""
        super().__init__(f"{where}job {job_id!r} already exists")
        self.metadata = {"job_id": job_id, "field": field} if field else {"job_id": job_id}


class EtagMismatch(ChronoplaneError):
    reason = "ETAG_MISMATCH"

    def __init__(self, job_id: str, given: str, current: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"job {job_id!r} has etag {current!r}, not {given!r}: it changed since it was read"
        )


class FailedPrecondition(ChronoplaneError):
    reason = "FAILED_PRECONDITION"


class TaskNotRegistered(FailedPrecondition):
    reason = "TASK_NOT_REGISTERED"

    def __init__(self, task: str) -> None:
        self.task = task
        super().__init__(f"task {task!r} is not registered on this server")


class CeleryNotEnabled(FailedPrecondition):
    reason = "CELERY_NOT_ENABLED"

    def __init__(self) -> None:
        super().__init__(
            "this server does not send executions to Celery: start it with celery_broker_url "
            "(--celery-broker-url) to create jobs with executor EXECUTOR_CELERY"
        )


class ExecutionFinished(FailedPrecondition):
    reason = "EXECUTION_FINISHED"

    def __init__(self, execution_id: str, state: str) -> None:
        self.execution_id = execution_id
        super().__init__(f"execution {execution_id!r} is already {state}")


class StorageUnavailable(ChronoplaneError, ConnectionError):
    reason = "STORAGE_UNAVAILABLE"


class StorageConflict(ChronoplaneError):
    """The database rolled the transaction back because of another one (a deadlock, a lock
    not granted in time, a serialization failure), even after the store retried it: nothing
    was written, and calling again is safe."""

    reason = "STORAGE_CONFLICT"


class ServerStopping(ChronoplaneError):
    reason = "SERVER_STOPPING"

    def __init__(self, cursor: int) -> None:
        super().__init__(
            f"this server is shutting down; resume the watch on another with after_cursor {cursor}"
        )
        self.metadata = {"cursor": str(cursor)}


class CancellationPending(ChronoplaneError, TimeoutError):
    """A cancel request was recorded, but the instance running the execution has not
    confirmed it in time; it stands, and is carried out when that instance sees it."""

    reason = "CANCELLATION_PENDING"

    def __init__(self, execution_id: str, instance_id: str, waited: float) -> None:
        self.execution_id = execution_id
        self.instance_id = instance_id
        super().__init__(
            f"execution {execution_id!r} runs on instance {instance_id}, which has not stopped "
            f"it within {waited:g} s; the request stands: it is cancelled when that instance "
            "sees it, or ABANDONED if that instance is dead (calling again is safe)"
        )


class InstanceConflict(ChronoplaneError):
    reason = "INSTANCE_CONFLICT"


class NotLeader(ChronoplaneError):
    """A write only the leader may make, refused: the leadership epoch is no longer ours."""

    reason = "NOT_LEADER"

    def __init__(self, epoch: int, current: int) -> None:
        self.epoch = epoch
        self.current = current
        super().__init__(f"fenced: this instance led epoch {epoch}; the current epoch is {current}")


class CursorOutOfRange(ChronoplaneError):
    reason = "CURSOR_OUT_OF_RANGE"

    def __init__(self, cursor: int, *, oldest: int, newest: int) -> None:
        if cursor < oldest - 1:
            why = f"events up to {oldest - 1} have been purged"
        else:
            why = f"no event has a cursor past {newest} yet"
        super().__init__(
            f"after_cursor {cursor} is outside the kept event history ({why}); the oldest "
            f"kept cursor is {oldest}, the newest {newest}: resume from one of them, or "
            "start again with a snapshot"
        )
        self.metadata = {"oldest_cursor": str(oldest), "newest_cursor": str(newest)}


class ResourceExhausted(ChronoplaneError):
    reason = "RESOURCE_EXHAUSTED"


class TooManyWatchers(ResourceExhausted):
    reason = "TOO_MANY_WATCHERS"

    def __init__(self, limit: int) -> None:
        super().__init__(f"this server already serves max_watchers ({limit}) watch streams")
        self.metadata = {"limit": "max_watchers", "max_watchers": str(limit)}


class WatchFellBehind(ResourceExhausted):
    reason = "WATCH_FELL_BEHIND"

    def __init__(self, cursor: int, buffer: int) -> None:
        super().__init__(
            f"this stream fell watch_buffer ({buffer}) events behind and was ended; resume "
            f"with after_cursor {cursor}"
        )
        self.metadata = {"cursor": str(cursor), "limit": "watch_buffer"}


class Unauthenticated(ChronoplaneError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(ChronoplaneError):
    reason = "PERMISSION_DENIED"
