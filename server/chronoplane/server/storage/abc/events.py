"""The watch history."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime

from chronoplane.server.models import (
    Event,
    EventWindow,
    Execution,
    Job,
    SnapshotPoint,
)

__all__ = ["EventStore"]


class EventStore(ABC):
    """The watch history (docs/decisions/0011 and 0015). Every method of the other
    contracts that changes an execution's state or outcome, or creates, changes or deletes
    a job, appends an event in its own transaction."""

    @abstractmethod
    async def events_after(
        self, cursor: int, *, limit: int, job_ids: Sequence[str] = ()
    ) -> tuple[list[Event], EventWindow]:
        """Up to ``limit`` events after ``cursor`` in cursor order (of these jobs only, if
        given), and the kept history as read after them: if ``window.purged_through`` is past
        ``cursor``, some events after it may be gone."""

    @abstractmethod
    async def newest_events(self, cursor: int, *, limit: int) -> list[Event]:
        """Up to ``limit`` events after ``cursor``, without the window (the hub's read).

        Like ``events_after``, it returns only events up to the point below which every
        cursor is decided (committed or gone): one that returns nothing past ``n`` has not
        skipped a cursor below ``n`` that is still to come."""

    @property
    @abstractmethod
    def events_behind(self) -> bool:
        """Whether events were being written past what the last read could return: a reader
        should read again soon rather than wait to be woken."""

    @abstractmethod
    async def event_window(self) -> EventWindow:
        """The cursors of the kept history; ``newest`` as of now (it waits for the writers of
        events in flight, usually milliseconds)."""

    @abstractmethod
    async def snapshot_executions(
        self, job_ids: Sequence[str] = ()
    ) -> tuple[SnapshotPoint, list[tuple[Execution, dict[str, str]]]]:
        """The PENDING and RUNNING executions (of these jobs, if given) with their jobs'
        labels, and the point of the event history they are consistent with: every change
        up to its cursor and those it includes, none after."""

    @abstractmethod
    async def snapshot_jobs(self, job_ids: Sequence[str] = ()) -> tuple[SnapshotPoint, list[Job]]:
        """Every job (of these, if given), and the point of the history they are consistent
        with."""

    @abstractmethod
    async def purge_events(self, *, before: datetime) -> int:
        """Deletes the events created before ``before``; returns how many."""
