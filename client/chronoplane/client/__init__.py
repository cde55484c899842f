"""Python SDK for Chronoplane.

    import asyncio
    from chronoplane.client import AsyncClient, cron, every, retry_policy

    async def main() -> None:
        async with AsyncClient("127.0.0.1:50051") as client:
            job = await client.create_job("heartbeat", task="chronoplane.echo", trigger=every(5))
            execution = await client.trigger_job(job.id)
            await client.create_job(
                "report",
                task="reports.daily",
                trigger=cron("0 6 * * *", "Europe/Berlin", jitter=300),
                misfire_policy="run_all",
                overlap_policy="buffer_one",
                retry=retry_policy(3, initial_backoff=10),
                timeout=3600,
            )

    asyncio.run(main())

:class:`Client` has the same methods for code without an event loop
(``with Client(address) as client: client.get_job("report")``).

Calls return frozen dataclasses (``chronoplane.client.models``: :class:`Job`,
:class:`Execution`, ...) with aware datetimes, timedeltas and plain JSON values; enums are
``StrEnum``s, accepted by name wherever the client takes one. A failed call raises a subclass
of :class:`ChronoplaneError` (the tree is drawn in ``chronoplane.client.errors``).
"""

from __future__ import annotations

from chronoplane.client._async import AsyncClient
from chronoplane.client._sync import Client
from chronoplane.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    ChronoplaneError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from chronoplane.client.models import (
    AuditEvent,
    BackfillResult,
    CeleryOptions,
    CronTrigger,
    DateTrigger,
    Execution,
    ExecutionSource,
    ExecutionState,
    ExecutionSummary,
    Executor,
    Instance,
    IntervalTrigger,
    Job,
    MisfirePolicy,
    MissedFires,
    OverlapPolicy,
    RetryPolicy,
    Task,
    Trigger,
    WatchEvent,
    WatchEventKind,
    at,
    cron,
    every,
    retry_policy,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "AuditEvent",
    "BackfillResult",
    "Cancelled",
    "CeleryOptions",
    "ChronoplaneError",
    "Client",
    "CronTrigger",
    "DateTrigger",
    "DeadlineExceeded",
    "Execution",
    "ExecutionSource",
    "ExecutionState",
    "ExecutionSummary",
    "Executor",
    "FailedPrecondition",
    "Instance",
    "Internal",
    "IntervalTrigger",
    "InvalidArgument",
    "Job",
    "MisfirePolicy",
    "MissedFires",
    "NotFound",
    "OutOfRange",
    "OverlapPolicy",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "Task",
    "Trigger",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "WatchEvent",
    "WatchEventKind",
    "at",
    "cron",
    "every",
    "retry_policy",
]
