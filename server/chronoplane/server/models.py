"""Domain types: frozen, keyword-only, free of gRPC, SQL and APScheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeAlias

__all__ = [
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_MISFIRE_GRACE",
    "FINAL_STATES",
    "CronTrigger",
    "DateTrigger",
    "Execution",
    "ExecutionPage",
    "ExecutionQuery",
    "ExecutionSource",
    "ExecutionState",
    "ExecutionSummary",
    "IntervalTrigger",
    "JSONObject",
    "Job",
    "JobPage",
    "Trigger",
]

JSONObject: TypeAlias = dict[str, Any]

DEFAULT_MISFIRE_GRACE = timedelta(seconds=60)
DEFAULT_MAX_CONCURRENT = 1


class ExecutionState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    MISSED = "missed"
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"


FINAL_STATES = frozenset(
    {
        ExecutionState.SUCCEEDED,
        ExecutionState.FAILED,
        ExecutionState.MISSED,
        ExecutionState.SKIPPED,
        ExecutionState.INTERRUPTED,
    }
)


class ExecutionSource(enum.StrEnum):
    SCHEDULE = "schedule"
    MANUAL = "manual"


@dataclass(frozen=True, kw_only=True)
class CronTrigger:
    expression: str
    time_zone: str = "UTC"


@dataclass(frozen=True, kw_only=True)
class IntervalTrigger:
    every: timedelta
    start_time: datetime | None = None
    end_time: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class DateTrigger:
    run_time: datetime


Trigger: TypeAlias = CronTrigger | IntervalTrigger | DateTrigger


@dataclass(frozen=True, kw_only=True)
class ExecutionSummary:
    id: str
    state: ExecutionState
    source: ExecutionSource
    scheduled_time: datetime
    start_time: datetime | None
    end_time: datetime | None


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
    coalesce: bool = True
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    labels: dict[str, str] = field(default_factory=dict)
    # Set by the store.
    version: int = 0
    create_time: datetime | None = None
    update_time: datetime | None = None
    next_run_time: datetime | None = None
    last_execution: ExecutionSummary | None = None

    @property
    def etag(self) -> str:
        return str(self.version)


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
