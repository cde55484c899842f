"""The storage contract: one small contract per aggregate, in the modules beside this one, and
``Store``, all of them together, which the server is given. One implementation per database
technology (``storage/sqlalchemy/``, the same module names); one test suite for all
(``tests/store/``).

==============  ==========================================================================
jobs            the jobs users create, change and delete
executions      the queue (admission, slots, claims), progress and history of executions
dispatches      Celery dispatches, and the leases of the workers running them
instances       instances, heartbeats and fences, and the leadership term
events          the watch history
access          API tokens, the audit log, server secrets
==============  ==========================================================================

A use case that spans aggregates commits once: a fire writes its execution and its watch
event in one transaction; so does a progress write with its next run times.
"""

from __future__ import annotations

from abc import abstractmethod

from chronoplane.server.storage.abc.access import AccessStore
from chronoplane.server.storage.abc.dispatches import Dispatch, DispatchClaim, DispatchStore
from chronoplane.server.storage.abc.events import EventStore
from chronoplane.server.storage.abc.executions import (
    DISPLACED,
    Admission,
    Admitted,
    CancelRequest,
    Claim,
    EndedCount,
    ExecutionFinish,
    ExecutionStore,
    NextRun,
    Progress,
    QueueDepth,
    SlotRelease,
)
from chronoplane.server.storage.abc.instances import InstanceStore
from chronoplane.server.storage.abc.jobs import (
    DueKey,
    JobChange,
    JobDeletion,
    JobRefusal,
    JobStore,
    JobUpdate,
)

__all__ = [
    "DISPLACED",
    "AccessStore",
    "Admission",
    "Admitted",
    "CancelRequest",
    "Claim",
    "Dispatch",
    "DispatchClaim",
    "DispatchStore",
    "DueKey",
    "EndedCount",
    "EventStore",
    "ExecutionFinish",
    "ExecutionStore",
    "InstanceStore",
    "JobChange",
    "JobDeletion",
    "JobRefusal",
    "JobStore",
    "JobUpdate",
    "NextRun",
    "Progress",
    "QueueDepth",
    "SlotRelease",
    "Store",
]


class Store(JobStore, ExecutionStore, DispatchStore, InstanceStore, EventStore, AccessStore):
    """Every aggregate's contract, on one database. Errors: ``StorageUnavailable`` when the
    database cannot be reached, ``StorageConflict`` when a transaction lost to another even
    after the store retried it, besides those each method names."""

    @abstractmethod
    async def close(self) -> None:
        """Releases every connection."""
