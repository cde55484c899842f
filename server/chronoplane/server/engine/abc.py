"""The engine contract: trigger arithmetic and an in-memory timer rebuilt from the database."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from chronoplane.server.models import Job, Trigger

__all__ = ["Engine", "Fire", "FireHandler"]


@dataclass(frozen=True, kw_only=True)
class Fire:
    """A scheduled fire of ``job`` (the job as it was when scheduled)."""

    job: Job
    scheduled_time: datetime
    # When the engine noticed the fire; ``lateness`` is the difference.
    noticed_time: datetime
    # The fire after this one, or None when the trigger is done.
    next_run_time: datetime | None

    @property
    def lateness(self) -> timedelta:
        return self.noticed_time - self.scheduled_time

    @property
    def missed(self) -> bool:
        return self.lateness > self.job.misfire_grace


FireHandler = Callable[[Sequence[Fire]], None]
"""Called on the event loop with due fires; must not block (queue the work, return)."""


class Engine(ABC):
    """Knows what triggers mean, and fires scheduled jobs on time.

    The database is the source of truth: the engine holds only what ``schedule`` gave it and
    can be rebuilt from the store at any time.
    """

    @abstractmethod
    def check(self, trigger: Trigger, *, now: datetime) -> None:
        """Raises ``InvalidArgument`` (fields relative to the trigger, like
        ``cron.expression``) when the trigger is malformed, can never fire, or would first
        fire more than 100 years after ``now``; quickly, whatever the input."""

    @abstractmethod
    def next_fire_time(self, trigger: Trigger, *, after: datetime) -> datetime | None:
        """The first fire at or after ``after``; None when the trigger will not fire again.

        A date trigger gives its run time even when that is before ``after``, so that a job
        created late still fires once (or is recorded missed)."""

    @abstractmethod
    def preview(self, trigger: Trigger, *, start: datetime, count: int) -> list[datetime]:
        """Up to ``count`` fire times at or after ``start``, ascending."""

    @abstractmethod
    def fires_between(
        self, trigger: Trigger, *, start: datetime, end: datetime, limit: int
    ) -> list[datetime]:
        """The first ``limit`` fire times t with ``start <= t <= end``, ascending, for catch-up
        after downtime and for backfill. Asks the trigger at most ``limit + 1`` times, so a
        long gap costs no more than the fires wanted."""

    @abstractmethod
    async def start(self, handler: FireHandler) -> None:
        """Starts the timer on the running loop; due fires go to ``handler``. Jobs may be
        scheduled before (the fast way to load many) and after."""

    @abstractmethod
    def schedule(self, job: Job, *, reschedule: bool) -> None:
        """Adds ``job`` (or replaces it) to fire at ``job.next_run_time`` and after.

        With ``reschedule=False`` an already scheduled job keeps its timing and only takes the
        new definition (task, args, policies). A job without next_run_time is unscheduled.
        """

    @abstractmethod
    def unschedule(self, job_id: str) -> None:
        """Forgets the job; unknown ids are ignored."""

    @abstractmethod
    def scheduled(self) -> Mapping[str, Job]:
        """The jobs scheduled now, by id, as last given to ``schedule``."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stops firing and forgets every job. Idempotent; ``start`` may follow again."""
