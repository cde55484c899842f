"""Jobs: the resources users create, change and delete."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TypeAlias

from chronoplane.server.errors import EtagMismatch, JobNotFound
from chronoplane.server.models import (
    Job,
    JobPage,
)

__all__ = ["DueKey", "JobChange", "JobDeletion", "JobRefusal", "JobStore", "JobUpdate"]

DueKey: TypeAlias = tuple[datetime, str]
"""Where a page of due jobs ends: the last job's next run time and id."""


@dataclass(frozen=True, kw_only=True)
class JobUpdate:
    """``job``'s fields replace those of the stored job of its id, if that is at version
    ``expected_version``."""

    job: Job
    expected_version: int

    @property
    def job_id(self) -> str:
        return self.job.id


@dataclass(frozen=True, kw_only=True)
class JobDeletion:
    """The job and its executions go, if it is at version ``expected_version`` (None: at
    any)."""

    job_id: str
    expected_version: int | None = None


JobChange: TypeAlias = JobUpdate | JobDeletion
JobRefusal: TypeAlias = JobNotFound | EtagMismatch
"""Why a change of one job changed nothing."""


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

    async def update_job(self, job: Job, *, expected_version: int) -> Job:
        """Replaces the job's fields, bumps its version and returns it (as ``get_job`` would).

        Raises ``JobNotFound``, or ``EtagMismatch`` if the stored version is not
        ``expected_version``.
        """
        [outcome] = await self.change_jobs([JobUpdate(job=job, expected_version=expected_version)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def delete_job(self, job_id: str, *, expected_version: int | None) -> None:
        """Deletes the job and its executions. Raises ``JobNotFound`` or ``EtagMismatch``."""
        deletion = JobDeletion(job_id=job_id, expected_version=expected_version)
        [outcome] = await self.change_jobs([deletion])
        if isinstance(outcome, Exception):
            raise outcome

    @abstractmethod
    async def change_jobs(self, changes: Sequence[JobChange]) -> list[Job | JobRefusal]:
        """Applies the changes, each compare-and-swap on its job's version, in one
        transaction, with one event and one NOTIFY per job changed. Returns each change's
        outcome, in order: an updated job as ``get_job`` would return it, a deleted one as
        it was; or, for a change that changed nothing, why (``JobNotFound``,
        ``EtagMismatch``), without failing the others. The job ids must differ among
        ``changes`` (a job's events are one per transaction).

        Raises only what fails them all (the database's errors): then nothing is written.
        """

    @abstractmethod
    async def last_fires(self, job_ids: Sequence[str]) -> dict[str, datetime]:
        """The latest scheduled fire recorded for each job (run or counted as missed); jobs
        without one are left out."""
