"""Jobs: the resources users create, change and delete."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from datetime import datetime
from typing import TypeAlias

from chronoplane.server.models import (
    Job,
    JobPage,
)

__all__ = ["DueKey", "JobStore"]

DueKey: TypeAlias = tuple[datetime, str]
"""Where a page of due jobs ends: the last job's next run time and id."""


class JobStore(ABC):
    """Jobs. Every change is compare-and-swap on the version, and wakes the leader of a
    cluster."""

    async def create_job(self, job: Job, *, request_id: str | None) -> Job:
        """Inserts ``job`` at version 1 and returns it as stored.

        Raises ``JobAlreadyExists`` if the id or the request_id is taken.
        """
        [stored] = await self.create_jobs([job], request_ids=[request_id])
        return stored

    @abstractmethod
    async def create_jobs(
        self, new: Sequence[Job], *, request_ids: Sequence[str | None]
    ) -> list[Job]:
        """Inserts the jobs at version 1, each with its request_id (the same length), in one
        transaction with one ADDED event each, in order: all of them, or on any error none.
        Returns them as stored, in order. The ids and request_ids must differ among ``new``.

        Raises ``JobAlreadyExists`` naming the first job whose id or request_id is taken.
        """

    @abstractmethod
    async def get_job(self, job_id: str) -> Job:
        """Returns the job with its last execution summary. Raises ``JobNotFound``."""

    async def get_job_by_request_id(self, request_id: str) -> Job | None:
        """Returns the job a CreateJob with this request_id made, if any."""
        return (await self.get_jobs_by_request_ids([request_id])).get(request_id)

    @abstractmethod
    async def get_jobs_by_request_ids(self, request_ids: Sequence[str]) -> dict[str, Job]:
        """The jobs created with these request_ids, by request_id; those not used are left
        out."""

    @abstractmethod
    async def list_jobs(self, *, after: str | None, limit: int) -> JobPage:
        """Jobs ordered by id, those with an id greater than ``after``."""

    @abstractmethod
    async def due_jobs(
        self,
        *,
        since: datetime | None,
        until: datetime,
        after: DueKey | None,
        limit: int,
    ) -> list[Job]:
        """Up to ``limit`` jobs that are not paused with a next run time after ``since`` (when
        given) and at or before ``until``, ordered by next run time and id, those past the key
        ``after`` (the last page's last job); without execution summaries. An index serves
        it: the leader fills its timer with the jobs due soon, a page at a time."""

    @abstractmethod
    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        """Those of the jobs that exist, without execution summaries."""

    @abstractmethod
    async def update_job(self, job: Job, *, expected_version: int) -> Job:
        """Replaces the job's fields, bumps its version and returns it.

        Raises ``JobNotFound``, or ``EtagMismatch`` if the stored version is not
        ``expected_version``.
        """

    @abstractmethod
    async def delete_job(self, job_id: str, *, expected_version: int | None) -> None:
        """Deletes the job and its executions. Raises ``JobNotFound`` or ``EtagMismatch``."""

    @abstractmethod
    async def last_fires(self, job_ids: Sequence[str]) -> dict[str, datetime]:
        """The latest scheduled fire recorded for each job (run or counted as missed); jobs
        without one are left out."""
