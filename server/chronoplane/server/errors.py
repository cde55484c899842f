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
│   └── TaskNotRegistered
├── StorageUnavailable (ConnectionError) the database cannot be reached
├── CancellationPending (TimeoutError)  the instance running it has not stopped it yet
├── InstanceConflict                    another server already uses this database
└── NotLeader                           a leader's write after it lost leadership (fenced)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AlreadyExists",
    "CancellationPending",
    "ChronoplaneError",
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
    "StorageUnavailable",
    "TaskNotRegistered",
]


class ChronoplaneError(Exception):
    """Root of every error the server raises on purpose."""

    reason = "CHRONOPLANE_ERROR"


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

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id!r} already exists")


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


class ExecutionFinished(FailedPrecondition):
    reason = "EXECUTION_FINISHED"

    def __init__(self, execution_id: str, state: str) -> None:
        self.execution_id = execution_id
        super().__init__(f"execution {execution_id!r} is already {state}")


class StorageUnavailable(ChronoplaneError, ConnectionError):
    reason = "STORAGE_UNAVAILABLE"


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
