"""Domain types: frozen, keyword-only, free of gRPC, SQL and APScheduler."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cache, cached_property
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "ABANDONED_ERROR_TYPE",
    "DEFAULT_CATCHUP_LIMIT",
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_MISFIRE_GRACE",
    "FINAL_STATES",
    "SCHEDULE_PRINCIPAL",
    "AuditEvent",
    "AuditPage",
    "AuditQuery",
    "CeleryOptions",
    "CronTrigger",
    "DateTrigger",
    "DayMatch",
    "Event",
    "EventKind",
    "EventResource",
    "EventWindow",
    "Execution",
    "ExecutionPage",
    "ExecutionQuery",
    "ExecutionSource",
    "ExecutionState",
    "ExecutionSummary",
    "ExecutorKind",
    "Instance",
    "IntervalTrigger",
    "JSONObject",
    "Job",
    "JobPage",
    "MisfirePolicy",
    "MissedFires",
    "OverlapPolicy",
    "RetryPolicy",
    "Role",
    "RunPolicy",
    "SnapshotPoint",
    "StoredToken",
    "Trigger",
    "evolve",
]

JSONObject: TypeAlias = dict[str, Any]

_D = TypeVar("_D", bound="DataclassInstance")


def evolve(instance: _D, /, **changes: Any) -> _D:
    """``dataclasses.replace`` without ``__init__``, for the paths that run per fire. A
    frozen dataclass's ``__init__`` sets every field through ``object.__setattr__``:
    replacing three fields of an Execution (26 fields) took 6.9 µs against 1.3 here, twice
    per fire, 9.7 % of the fire writer's CPU at 1,000 fires a second (py-spy). Fields only
    are copied (a ``cached_property``'s value is not); an unknown field is an error."""
    names = _field_names(type(instance))
    if not changes.keys() <= names:
        unknown = ", ".join(sorted(changes.keys() - names))
        raise TypeError(f"{type(instance).__name__} has no field {unknown}")
    values = instance.__dict__
    if len(values) != len(names):  # cached values beside the fields
        values = {name: values[name] for name in names}
    new = object.__new__(type(instance))
    new.__dict__.update(values)
    new.__dict__.update(changes)
    return new


@cache
def _field_names(kind: type[DataclassInstance]) -> frozenset[str]:
    if hasattr(kind, "__post_init__") or hasattr(kind, "__slots__"):
        raise TypeError(f"{kind.__name__} cannot be evolved: use dataclasses.replace")
    return frozenset(f.name for f in dataclasses.fields(kind))


DEFAULT_MISFIRE_GRACE = timedelta(seconds=60)
# The error type of an ABANDONED execution, as a job's retry_on names it ("Abandoned" too).
ABANDONED_ERROR_TYPE = "chronoplane.Abandoned"
DEFAULT_MAX_CONCURRENT = 1
# Who triggers a scheduled fire (Execution.triggered_by).
SCHEDULE_PRINCIPAL = "system:schedule"
DEFAULT_CATCHUP_LIMIT = 10


class ExecutionState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    MISSED = "missed"
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    ABANDONED = "abandoned"


FINAL_STATES = frozenset(set(ExecutionState) - {ExecutionState.PENDING, ExecutionState.RUNNING})


class ExecutionSource(enum.StrEnum):
    SCHEDULE = "schedule"
    MANUAL = "manual"
    RETRY = "retry"
    BACKFILL = "backfill"


class MisfirePolicy(enum.StrEnum):
    """What to do with scheduled fires found later than the job's misfire grace."""

    SKIP = "skip"
    """Run none of them; record them."""
    RUN_ONCE = "run_once"
    """Run the latest one inside the catch-up window; record the rest."""
    RUN_ALL = "run_all"
    """Run each one inside the catch-up window, the latest ``catchup_limit``; record the rest."""


class OverlapPolicy(enum.StrEnum):
    """What a fire does when the job already has ``max_concurrent`` executions running."""

    SKIP = "skip"
    ALLOW = "allow"
    BUFFER_ONE = "buffer_one"
    BUFFER_ALL = "buffer_all"
    CANCEL_RUNNING = "cancel_running"


class ExecutorKind(enum.StrEnum):
    """Where a job's executions run."""

    INLINE = "inline"
    """On a Chronoplane server, from its task registry."""
    CELERY = "celery"
    """On a Celery worker: the server sends the task to the broker."""


@dataclass(frozen=True, kw_only=True)
class CeleryOptions:
    """How a Celery job's tasks are routed; empty means Celery's defaults."""

    queue: str = ""
    routing_key: str = ""
    priority: int | None = None
    """0 to 9 (what both Redis and RabbitMQ transports take); None leaves it unset."""


class DayMatch(enum.StrEnum):
    """How a cron expression's day of month and day of week join when both are restricted."""

    ANY = "any"
    """Either may match: crontab's rule (cronie, Vixie cron, Kubernetes)."""
    ALL = "all"
    """Both must match: Chronoplane's rule before migration 0014."""


@dataclass(frozen=True, kw_only=True)
class CronTrigger:
    expression: str
    time_zone: str = "UTC"
    day_match: DayMatch = DayMatch.ANY
    start_time: datetime | None = None
    end_time: datetime | None = None
    jitter: timedelta = timedelta(0)


@dataclass(frozen=True, kw_only=True)
class IntervalTrigger:
    every: timedelta
    start_time: datetime | None = None
    end_time: datetime | None = None
    jitter: timedelta = timedelta(0)


@dataclass(frozen=True, kw_only=True)
class DateTrigger:
    run_time: datetime
    """The instant; for a wall time, the one it resolved to (walltime.py)."""
    jitter: timedelta = timedelta(0)
    local_time: datetime | None = None
    """A naive wall time in ``time_zone``, when the trigger was given one."""
    time_zone: str = ""


Trigger: TypeAlias = CronTrigger | IntervalTrigger | DateTrigger


@dataclass(frozen=True, kw_only=True)
class ExecutionSummary:
    id: str
    state: ExecutionState
    source: ExecutionSource
    scheduled_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    attempt: int = 1


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How a FAILED or TIMED_OUT execution is tried again, each attempt its own execution."""

    max_attempts: int = 1
    """Attempts in all, the first included; 1 means no retry."""
    initial_backoff: timedelta = timedelta(seconds=1)
    multiplier: float = 2.0
    max_backoff: timedelta = timedelta(minutes=10)
    retry_on: tuple[str, ...] = ()
    """Exception class names (simple or qualified; base classes match); empty means any.
    A timed-out run counts as ``TimeoutError``."""

    def backoff(self, attempt: int) -> timedelta:
        """The wait before attempt ``attempt + 1``, after attempt ``attempt`` (1-based)."""
        seconds = self.initial_backoff.total_seconds() * self.multiplier ** (attempt - 1)
        return min(timedelta(seconds=seconds), self.max_backoff)

    def retries(self, attempt: int, error_types: tuple[str, ...]) -> bool:
        """Whether a failure of attempt ``attempt`` with an error of ``error_types`` (its
        class and base classes, qualified names) is tried again."""
        if attempt >= self.max_attempts:
            return False
        if not self.retry_on:
            return True
        wanted = set(self.retry_on)
        return any(name in wanted or name.rpartition(".")[2] in wanted for name in error_types)


@dataclass(frozen=True, kw_only=True)
class RunPolicy:
    """What an instance running an execution needs of its job."""

    timeout: timedelta | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(frozen=True, kw_only=True)
class MissedFires:
    """Scheduled fires that did not run, summarised in one execution."""

    count: int
    first_time: datetime
    last_time: datetime
    count_is_lower_bound: bool = False


@dataclass(frozen=True, kw_only=True)
class Job:
    id: str
    task: str
    trigger: Trigger
    display_name: str = ""
    description: str = ""
    args: JSONObject = field(default_factory=dict)
    paused: bool = False
    misfire_grace: timedelta = DEFAULT_MISFIRE_GRACE
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    labels: dict[str, str] = field(default_factory=dict)
    misfire_policy: MisfirePolicy = MisfirePolicy.RUN_ONCE
    catchup_window: timedelta | None = None
    """Missed fires older than this are never run; None means no limit."""
    catchup_limit: int = DEFAULT_CATCHUP_LIMIT
    overlap_policy: OverlapPolicy = OverlapPolicy.SKIP
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: timedelta | None = None
    history_limit: int = 0
    """Executions kept for this job (the newest); 0 means only the server's age limit."""
    created_by: str = ""
    """Who created it (an audit principal: token:<name>, cert:<subject>, anonymous)."""
    updated_by: str = ""
    """Who last changed it through the API."""
    executor: ExecutorKind = ExecutorKind.INLINE
    celery: CeleryOptions = field(default_factory=CeleryOptions)
    # Set by the store.
    version: int = 0
    create_time: datetime | None = None
    update_time: datetime | None = None
    next_run_time: datetime | None = None
    last_execution: ExecutionSummary | None = None

    @property
    def etag(self) -> str:
        return str(self.version)

    @property
    def run_policy(self) -> RunPolicy:
        return RunPolicy(timeout=self.timeout, retry=self.retry)

    @property
    def coalesce(self) -> bool:
        """The v1 field misfire_policy replaced: whether a backlog folds into one run."""
        return self.misfire_policy is not MisfirePolicy.RUN_ALL


@dataclass(frozen=True, kw_only=True)
class Execution:
    id: str
    job_id: str
    state: ExecutionState
    source: ExecutionSource
    scheduled_time: datetime
    create_time: datetime
    task: str
    args: JSONObject
    instance_id: str
    start_time: datetime | None = None
    end_time: datetime | None = None
    result: Any = None
    error_message: str = ""
    error_traceback: str = ""
    request_id: str = ""
    attempt: int = 1
    first_execution_id: str = ""
    """The first attempt's id, for a retry; empty for a first attempt."""
    error_type: str = ""
    """The qualified class name of what the task raised."""
    missed: MissedFires | None = None
    note: str = ""
    """What happened after the final state was recorded (a late result, say)."""
    triggered_by: str = ""
    """Who asked for the run: a principal, or system:schedule; a retry keeps its first
    attempt's."""
    cancelled_by: str = ""
    """Who cancelled it (CancelExecution), or empty."""
    executor: ExecutorKind = ExecutorKind.INLINE
    celery_task_id: str = ""
    """The Celery task id once it was sent (the execution id)."""
    worker: str = ""
    """The Celery worker that runs (or ran) it."""
    pending_reason: str = ""
    """Why a PENDING execution has not started, when something stands in the way."""
    dispatch_time: datetime | None = None
    """When it was sent to the broker."""
    trace_parent: str = ""
    """The W3C traceparent of the RPC that asked for it, when traces are on (tracing.py)."""

    @property
    def duration(self) -> timedelta | None:
        if self.start_time is None or self.end_time is None:
            return None
        return self.end_time - self.start_time


@dataclass(frozen=True, kw_only=True)
class JobPage:
    jobs: list[Job]
    next_after: str | None
    """Id of the last job of this page when more may follow."""


@dataclass(frozen=True, kw_only=True)
class ExecutionQuery:
    job_id: str | None = None
    states: frozenset[ExecutionState] = frozenset()
    scheduled_after: datetime | None = None
    scheduled_before: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class ExecutionPage:
    executions: list[Execution]
    next_before: str | None
    """Id of the last execution of this page when more may follow."""


@dataclass(frozen=True, kw_only=True)
class Instance:
    """One server process, as registered in the database."""

    id: str
    name: str
    host: str
    pid: int
    version: str
    address: str
    insecure: bool
    start_time: datetime
    max_running: int = 0
    """How many executions it runs at once at most."""
    running: int = 0
    """How many it ran at its last heartbeat."""
    last_seen_time: datetime | None = None
    leader: bool = False
    draining: bool = False
    """It is stopping: it runs what it has to its end and takes nothing new."""
    epoch: int = 0
    """The leadership term it leads under; 0 when it does not lead."""


class EventResource(enum.StrEnum):
    """What an event is about (the value stored in events.resource)."""

    EXECUTION = "execution"
    JOB = "job"


class EventKind(enum.StrEnum):
    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"


@dataclass(frozen=True, kw_only=True, eq=False)
class Event:
    """A change of an execution or a job, at its place in the cluster's history. Compared
    by identity: one object is shared by every watcher it goes to. The resource is decoded
    when first asked for (most events reach no watcher that needs it)."""

    cursor: int
    kind: EventKind
    job_id: str
    # The job's labels (of the execution's job, for an execution event).
    labels: dict[str, str]
    resource: EventResource
    decode: Callable[[], Execution | Job] = field(repr=False)
    # When the change was committed (the writer's clock, just before its commit).
    create_time: datetime | None = None

    @cached_property
    def execution(self) -> Execution | None:
        if self.resource is not EventResource.EXECUTION:
            return None
        value = self.decode()
        assert isinstance(value, Execution)
        return value

    @cached_property
    def job(self) -> Job | None:
        if self.resource is not EventResource.JOB:
            return None
        value = self.decode()
        assert isinstance(value, Job)
        return value


@dataclass(frozen=True, kw_only=True)
class EventWindow:
    """The kept event history: cursors ``oldest`` (purged_through + 1) to ``newest``."""

    purged_through: int
    newest: int


@dataclass(frozen=True, kw_only=True)
class SnapshotPoint:
    """Where a snapshot stands in the event history: every change up to ``cursor`` is in it,
    and so are those of the later cursors ``included`` (committed before the snapshot was
    read, numbered after ``cursor`` was decided); a stream that goes on from ``cursor`` skips
    those."""

    cursor: int
    included: frozenset[int] = frozenset()


class Role(enum.IntEnum):
    """Each role may do what the ones below it may."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @classmethod
    def parse(cls, name: str) -> Role:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"{name!r} is not a role: viewer, operator or admin") from None


@dataclass(frozen=True, kw_only=True)
class StoredToken:
    id: str
    name: str
    role: Role
    secret_hash: str
    create_time: datetime
    expire_time: datetime | None
    revoke_time: datetime | None


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """One call of a mutating RPC, allowed or refused."""

    time: datetime
    principal: str
    """token:<name>, cert:<subject>, anonymous, or unauthenticated (credentials refused)."""
    role: str
    """The caller's role; empty when unauthenticated."""
    rpc: str
    job_id: str = ""
    execution_id: str = ""
    code: str = "OK"
    """The gRPC status code's name."""
    message: str = ""
    request: JSONObject = field(default_factory=dict)
    instance_id: str = ""
    peer: str = ""
    id: int = 0
    """Set by the store: increases with every event."""


@dataclass(frozen=True, kw_only=True)
class AuditQuery:
    principal: str = ""
    rpc: str = ""
    job_id: str = ""
    execution_id: str = ""
    after: datetime | None = None
    """Only events at or after this time."""
    before: datetime | None = None
    """Only events before this time."""


@dataclass(frozen=True, kw_only=True)
class AuditPage:
    events: list[AuditEvent]
    next_before: int | None
    """Id of the last event of this page when more may follow."""
