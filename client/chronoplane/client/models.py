"""What the SDK hands back: frozen dataclasses of plain Python values.

Times are aware datetimes in UTC, durations timedeltas, ``args`` and ``result`` plain JSON
values (a number without a fraction is an ``int``), enums ``StrEnum``s whose values are the
lowercase names (``ExecutionState.SUCCEEDED == "succeeded"``). A field the server left unset
is ``None``. Every enum is also accepted by name wherever the SDK takes one:
``"succeeded"``, ``"SUCCEEDED"`` or the proto's ``"EXECUTION_STATE_SUCCEEDED"``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Generic, TypeAlias, TypeVar

__all__ = [
    "AuditEvent",
    "BackfillResult",
    "CeleryOptions",
    "CronTrigger",
    "DateTrigger",
    "DayMatch",
    "Execution",
    "ExecutionSource",
    "ExecutionState",
    "ExecutionSummary",
    "Executor",
    "Instance",
    "IntervalTrigger",
    "Job",
    "MisfirePolicy",
    "MissedFires",
    "OverlapPolicy",
    "RetryPolicy",
    "Task",
    "Trigger",
    "WatchEvent",
    "WatchEventKind",
    "at",
    "cron",
    "every",
    "retry_policy",
]


class _ProtoEnum(StrEnum):
    """A proto enum by lowercase name; also found by its upper or full proto name."""

    @classmethod
    def proto_prefix(cls) -> str:
        """The proto's prefix of the names: ``EXECUTION_STATE_`` for ExecutionState."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).upper() + "_"

    @classmethod
    def _missing_(cls, value: object) -> _ProtoEnum | None:
        if not isinstance(value, str):
            return None
        name = value.strip().upper().replace("-", "_").removeprefix(cls.proto_prefix())
        return cls.__members__.get(name)


class ExecutionState(_ProtoEnum):
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

    @property
    def final(self) -> bool:
        """Whether an execution in this state will not change any more."""
        return self not in (ExecutionState.PENDING, ExecutionState.RUNNING)


class ExecutionSource(_ProtoEnum):
    SCHEDULE = "schedule"
    MANUAL = "manual"
    RETRY = "retry"
    BACKFILL = "backfill"


class Executor(_ProtoEnum):
    INLINE = "inline"
    CELERY = "celery"


class DayMatch(_ProtoEnum):
    """When both day fields of a cron expression are restricted: either may match (crontab's
    rule), or both must."""

    ANY = "any"
    ALL = "all"


class MisfirePolicy(_ProtoEnum):
    SKIP = "skip"
    RUN_ONCE = "run_once"
    RUN_ALL = "run_all"


class OverlapPolicy(_ProtoEnum):
    SKIP = "skip"
    ALLOW = "allow"
    BUFFER_ONE = "buffer_one"
    BUFFER_ALL = "buffer_all"
    CANCEL_RUNNING = "cancel_running"


class WatchEventKind(_ProtoEnum):
    ADDED = "added"
    MODIFIED = "modified"
    DELETED = "deleted"
    SNAPSHOT = "snapshot"
    SNAPSHOT_END = "snapshot_end"
    PROGRESS = "progress"


# -- what a job is made of ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CronTrigger:
    """Fires when ``expression`` matches, in ``time_zone`` (UTC when empty)."""

    expression: str
    time_zone: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None
    jitter: timedelta | None = None
    day_match: DayMatch = DayMatch.ANY
    """When both day fields are restricted: ANY (crontab's rule, the default) or ALL (jobs
    created before the field existed read as ALL, their rule then)."""


@dataclass(frozen=True, kw_only=True)
class IntervalTrigger:
    """Fires every ``every``, from ``start_time`` (or one period on) until ``end_time``."""

    every: timedelta
    start_time: datetime | None = None
    end_time: datetime | None = None
    jitter: timedelta | None = None


@dataclass(frozen=True, kw_only=True)
class DateTrigger:
    """Fires once, at ``run_time``; or at the wall time ``local_time`` (naive) in
    ``time_zone``, read with cron's rules (a time in a spring-forward gap fires at the gap's
    end, a repeated one at its first occurrence), ``run_time`` then being what it resolved to
    (None until the server has said)."""

    run_time: datetime | None = None
    jitter: timedelta | None = None
    local_time: datetime | None = None
    time_zone: str = ""


Trigger: TypeAlias = CronTrigger | IntervalTrigger | DateTrigger
"""When a job fires: one of the three trigger kinds."""


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Runs a failed or timed-out run again, up to ``max_attempts`` runs in all."""

    max_attempts: int
    initial_backoff: timedelta | None = None
    backoff_multiplier: float = 0.0
    max_backoff: timedelta | None = None
    retry_on: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class CeleryOptions:
    """How a job's runs are routed to Celery workers."""

    queue: str = ""
    routing_key: str = ""
    priority: int | None = None


@dataclass(frozen=True, kw_only=True)
class ExecutionSummary:
    """The newest execution of a job, as the job reports it."""

    id: str
    state: ExecutionState | None
    source: ExecutionSource | None
    scheduled_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    attempt: int


@dataclass(frozen=True, kw_only=True)
class Job:
    """A job as the server stores it (output-only fields included)."""

    id: str
    task: str
    trigger: Trigger | None
    args: dict[str, Any] = field(default_factory=dict)
    display_name: str = ""
    description: str = ""
    paused: bool = False
    misfire_grace: timedelta | None = None
    max_concurrent: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    misfire_policy: MisfirePolicy | None = None
    catchup_window: timedelta | None = None
    catchup_limit: int = 0
    overlap_policy: OverlapPolicy | None = None
    retry: RetryPolicy | None = None
    timeout: timedelta | None = None
    history_limit: int = 0
    executor: Executor | None = None
    celery: CeleryOptions | None = None
    etag: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    next_run_time: datetime | None = None
    last_execution: ExecutionSummary | None = None
    created_by: str = ""
    updated_by: str = ""


@dataclass(frozen=True, kw_only=True)
class MissedFires:
    """The fires a MISSED execution stands for."""

    count: int
    count_is_lower_bound: bool
    first_time: datetime | None
    last_time: datetime | None


@dataclass(frozen=True, kw_only=True)
class Execution:
    """One run of a job (or one fire that did not run: MISSED, SKIPPED)."""

    id: str
    job_id: str
    state: ExecutionState | None
    source: ExecutionSource | None
    task: str = ""
    args: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    """The task's return value as JSON (None when it returned nothing or has not ended)."""
    scheduled_time: datetime | None = None
    create_time: datetime | None = None
    dispatch_time: datetime | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    duration: timedelta | None = None
    error_type: str = ""
    error_message: str = ""
    error_traceback: str = ""
    attempt: int = 0
    first_execution_id: str = ""
    missed: MissedFires | None = None
    note: str = ""
    pending_reason: str = ""
    request_id: str = ""
    instance_id: str = ""
    executor: Executor | None = None
    celery_task_id: str = ""
    worker: str = ""
    triggered_by: str = ""
    cancelled_by: str = ""


@dataclass(frozen=True, kw_only=True)
class BackfillResult:
    """What BackfillJob did: the executions it created, oldest first, and how many fires
    of the range had been backfilled before (and were not run again)."""

    executions: list[Execution]
    already_backfilled: int


@dataclass(frozen=True, kw_only=True)
class Instance:
    """A server process sharing the database; ``leader`` fires the jobs."""

    id: str
    name: str
    host: str
    pid: int
    version: str
    address: str
    start_time: datetime | None
    last_seen_time: datetime | None
    leader: bool
    epoch: int
    insecure: bool
    draining: bool
    max_running: int
    running: int


@dataclass(frozen=True, kw_only=True)
class Task:
    """A task registered on the server."""

    name: str
    description: str = ""


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """One mutating call, as the audit log recorded it."""

    id: int
    time: datetime | None
    principal: str
    role: str
    rpc: str
    code: str
    message: str
    job_id: str = ""
    execution_id: str = ""
    request: dict[str, Any] = field(default_factory=dict)
    instance_id: str = ""
    peer: str = ""


T = TypeVar("T", Job, Execution)


@dataclass(frozen=True, kw_only=True)
class WatchEvent(Generic[T]):
    """One event of a watch. ``item`` is the job or execution as of ``cursor`` (None for
    SNAPSHOT_END and PROGRESS, which carry only the cursor); resume after ``cursor``."""

    cursor: int
    kind: WatchEventKind
    item: T | None


# -- builders, with durations as timedeltas or seconds -------------------------------------------


def _span(value: timedelta | float | None) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    return timedelta(seconds=value)


def cron(
    expression: str,
    time_zone: str = "",
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    jitter: timedelta | float | None = None,
    day_match: DayMatch | str = DayMatch.ANY,
) -> CronTrigger:
    """Fires when the cron expression matches, in the time zone (UTC when empty), never before
    start nor after end; each run starts up to ``jitter`` (a timedelta or seconds) late.
    ``day_match``: "any" (crontab's rule, the default) or "all" when both day fields are
    restricted."""
    return CronTrigger(
        expression=expression,
        time_zone=time_zone,
        start_time=start,
        end_time=end,
        jitter=_span(jitter),
        day_match=DayMatch(day_match),
    )


def every(
    period: timedelta | float,
    *,
    start: datetime | None = None,
    end: datetime | None = None,
    jitter: timedelta | float | None = None,
) -> IntervalTrigger:
    """Fires every period (a timedelta or seconds), from start (or one period on) until end;
    each run starts up to ``jitter`` late (less than the period)."""
    return IntervalTrigger(
        every=_span(period) or timedelta(0), start_time=start, end_time=end, jitter=_span(jitter)
    )


def at(
    when: datetime, *, time_zone: str = "", jitter: timedelta | float | None = None
) -> DateTrigger:
    """Fires once (up to ``jitter`` later): at an aware datetime, or at a wall time in a zone,
    a naive ``when`` with ``time_zone`` or a ``when`` whose tzinfo is a ZoneInfo. The server
    reads a wall time as cron does: one in a spring-forward gap fires at the gap's end, one
    that happens twice at its first occurrence (``fold=1`` names the second, as an instant)."""
    key = getattr(when.tzinfo, "key", None)
    if time_zone and when.tzinfo is not None:
        raise ValueError("with time_zone, give a naive datetime (a wall time in that zone)")
    if key is not None and not when.fold:
        time_zone, when = key, when.replace(tzinfo=None)
    if time_zone:
        return DateTrigger(local_time=when, time_zone=time_zone, jitter=_span(jitter))
    if when.tzinfo is None:
        raise ValueError("a naive datetime needs time_zone (or give an aware one)")
    return DateTrigger(run_time=when, jitter=_span(jitter))


def retry_policy(
    max_attempts: int,
    *,
    initial_backoff: timedelta | float | None = None,
    backoff_multiplier: float = 0.0,
    max_backoff: timedelta | float | None = None,
    retry_on: Iterable[str] = (),
) -> RetryPolicy:
    """Tries a failed or timed-out run again, up to ``max_attempts`` runs in all.

    The first retry waits ``initial_backoff`` (default 1 s), each further one
    ``backoff_multiplier`` (default 2) times longer, at most ``max_backoff`` (default 10 min).
    ``retry_on`` limits retries to failures raising these exception classes ("ConnectionError",
    "builtins.ConnectionError"; a timeout counts as "TimeoutError"); empty means any failure.
    """
    return RetryPolicy(
        max_attempts=max_attempts,
        initial_backoff=_span(initial_backoff),
        backoff_multiplier=backoff_multiplier,
        max_backoff=_span(max_backoff),
        retry_on=tuple(retry_on),
    )
