"""Python SDK for Chronoplane.

    from chronoplane.client import AsyncClient, every

    async with AsyncClient("127.0.0.1:50051") as client:
        job = await client.create_job("heartbeat", task="chronoplane.echo", trigger=every(5))
        execution = await client.trigger_job(job.id)

Calls return the protobuf messages of ``chronoplane.v1``; a failed call raises a subclass of
:class:`ChronoplaneError` (the tree is drawn in ``chronoplane.client.errors``).
"""

from __future__ import annotations

from chronoplane.client._client import AsyncClient
from chronoplane.client._convert import at, cron, every
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
]
