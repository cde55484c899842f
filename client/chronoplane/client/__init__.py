"""Python SDK for Chronoplane.

    from chronoplane.client import AsyncClient, cron, every, retry_policy

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

``client.batch_create_jobs([...])`` creates up to 1,000 jobs in one call, all or none, each
given as ``create_job``'s keyword arguments in a dict.

Calls return the protobuf messages of ``chronoplane.v1``; a failed call raises a subclass of
:class:`ChronoplaneError` (the tree is drawn in ``chronoplane.client.errors``).
"""

from __future__ import annotations

from chronoplane.client._client import AsyncClient
from chronoplane.client._convert import at, cron, every, retry_policy
from chronoplane.client.errors import (
    Aborted,
    AlreadyExists,
    ChronoplaneError,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "ChronoplaneError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "Unavailable",
    "Unimplemented",
    "at",
    "cron",
    "every",
    "retry_policy",
]
