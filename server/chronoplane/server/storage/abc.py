"""The storage contract. One implementation per database technology; one test suite for all."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from chronoplane.server.models import (
    Execution,
    ExecutionPage,
    ExecutionQuery,
    ExecutionState,
    Instance,
    Job,
    JobPage,
)

__all__ = ["ExecutionFinish", "ExecutionStart", "NextRun", "Store"]


@dataclass(frozen=True, kw_only=True)
class ExecutionStart:
    """A PENDING execution began running."""

    id: str
    start_time: datetime


@dataclass(frozen=True, kw_only=True)
class ExecutionFinish:
    """A PENDING or RUNNING execution reached a final state."""

    id: str
    state: ExecutionState
    start_time: datetime | None
    end_time: datetime
    result: Any = None
    error_message: str = ""
    error_traceback: str = ""
    error_type: str = ""


@dataclass(frozen=True, kw_only=True)
class NextRun:
    """The engine moved a job's next fire time; applies only if the job is still at version."""

    job_id: str
    version: int
    next_run_time: datetime | None


class Store(ABC):
    """Jobs and executions. Every method is one transaction: it happens whole or not at all.

    Errors: ``StorageUnavailable`` when the database cannot be reached, besides those each
    method names.
    """

    @abstractmethod
    async def close(self) -> None:
        """Releases every connection."""

    # -- jobs ---------------------------------------------------------------------------------

    @abstractmethod
    async def create_job(self, job: Job, *, request_id: str | None) -> Job:
        """Inserts ``job`` at version 1 and returns it as stored.

        Raises ``JobAlreadyExists`` if the id or the request_id is taken.
        """

    @abstractmethod
    async def get_job(self, job_id: str) -> Job:
        """Returns the job with its last execution summary. Raises ``JobNotFound``."""

    @abstractmethod
    async def get_job_by_request_id(self, request_id: str) -> Job | None:
        """Returns the job a CreateJob with this request_id made, if any."""

    @abstractmethod
    async def list_jobs(self, *, after: str | None, limit: int) -> JobPage:
        """Jobs ordered by id, those with an id greater than ``after``."""

    @abstractmethod
    async def list_schedulable_jobs(self) -> list[Job]:
        """Every job that is not paused, without execution summaries (for the engine)."""

    @abstractmethod
    async def update_job(self, job: Job, *, expected_version: int) -> Job:
        """Replaces the job's fields, bumps its version and returns it.

        Raises ``JobNotFound``, or ``EtagMismatch`` if the stored version is not
        ``expected_version``.
        """

    @abstractmethod
    async def delete_job(self, job_id: str, *, expected_version: int | None) -> None:
        """Deletes the job and its executions. Raises ``JobNotFound`` or ``EtagMismatch``."""

    # -- executions ---------------------------------------------------------------------------

    @abstractmethod
    async def insert_executions(
        self, executions: Sequence[Execution], *, epoch: int | None = None
    ) -> set[str]:
        """Inserts executions in one transaction.

        An execution whose (job, scheduled fire) or (job, request_id) already has one is not
        inserted; neither is one whose job no longer exists. Returns the ids inserted. With
        ``epoch`` (a leader's scheduled fires), raises ``NotLeader`` and writes nothing unless
        it is the current leadership epoch.
        """

    @abstractmethod
    async def record_progress(
        self,
        starts: Sequence[ExecutionStart],
        finishes: Sequence[ExecutionFinish],
        next_runs: Sequence[NextRun] = (),
        *,
        epoch: int | None = None,
    ) -> bool:
        """Applies state changes and moves next run times, in one transaction. A change to an
        execution that is already in a final state (or gone) is ignored: the first final
        state wins. With ``epoch``, next run times are moved only while it is the current
        leadership epoch; returns False when they were not."""

    @abstractmethod
    async def get_execution(self, execution_id: str) -> Execution:
        """Raises ``ExecutionNotFound``."""

    @abstractmethod
    async def get_execution_by_request_id(self, job_id: str, request_id: str) -> Execution | None:
        """The execution a TriggerJob with this request_id made for this job, if any."""

    @abstractmethod
    async def list_executions(
        self, query: ExecutionQuery, *, before: str | None, limit: int
    ) -> ExecutionPage:
        """Executions matching ``query``, newest first, those with an id less than ``before``."""

    @abstractmethod
    async def interrupt_unfinished(self, *, message: str, now: datetime) -> int:
        """Marks every PENDING or RUNNING execution INTERRUPTED, except those
        ``list_resumable`` returns; returns how many."""

    @abstractmethod
    async def list_resumable(self) -> list[Execution]:
        """PENDING retries and backfill fires, which never started (they are claimed before
        they start), oldest first."""

    @abstractmethod
    async def claim_execution(self, execution_id: str, *, start_time: datetime) -> bool:
        """PENDING -> RUNNING, now; False if it is no longer PENDING (cancelled, say)."""

    @abstractmethod
    async def finish_execution(self, finish: ExecutionFinish) -> bool:
        """Applies one final state now; False if the execution was already final (or gone)."""

    @abstractmethod
    async def add_note(self, execution_id: str, note: str) -> None:
        """Sets the execution's note (what happened after its final state)."""

    @abstractmethod
    async def purge_executions(
        self, *, job_id: str | None, ended_before: datetime | None, keep_last: int
    ) -> int:
        """Deletes final executions (of one job or all) that ended before ``ended_before``,
        and those older than each job's newest ``keep_last`` (when positive). Returns how
        many."""

    @abstractmethod
    async def purge_history_limits(self) -> int:
        """Applies every job's history_limit; returns how many executions were deleted."""

    # -- server -------------------------------------------------------------------------------

    @abstractmethod
    async def get_or_create_secret(self, name: str, value: bytes) -> bytes:
        """Returns the secret stored under ``name``, storing ``value`` first if there is none.
        Every instance sharing the database gets the same bytes."""

    @abstractmethod
    async def last_fires(self, job_ids: Sequence[str]) -> dict[str, datetime]:
        """The latest scheduled fire recorded for each job (run or counted as missed); jobs
        without one are left out."""

    # -- instances and leadership -------------------------------------------------------------

    @abstractmethod
    async def register_instance(self, instance: Instance) -> None:
        """Inserts (or refreshes) the instance's row; last seen now."""

    @abstractmethod
    async def heartbeat_instance(self, instance_id: str) -> bool:
        """Marks the instance seen now; False if its row is gone (it was taken for dead)."""

    @abstractmethod
    async def remove_instance(self, instance_id: str) -> None:
        """Deletes the instance's row (it stops)."""

    @abstractmethod
    async def list_instances(self, *, leader_timeout: timedelta) -> list[Instance]:
        """Every registered instance, oldest start first; ``leader`` is set on the one that
        was elected last, if it was seen within ``leader_timeout``."""

    @abstractmethod
    async def remove_stale_instances(self, *, stale_after: timedelta) -> list[str]:
        """Deletes instances not seen for ``stale_after`` (database time); returns their ids."""

    @abstractmethod
    async def take_over_orphans(
        self, *, owner: str, stale_after: timedelta, message: str, now: datetime
    ) -> tuple[list[Execution], list[Execution]]:
        """Executions held by instances that are not registered or not seen for
        ``stale_after``: running or waiting ones become ABANDONED with ``message``; waiting
        retries and backfill fires (which never started) pass to ``owner``. Returns
        (abandoned, adopted)."""

    @abstractmethod
    async def take_leadership(self, instance_id: str) -> int:
        """Bumps the leadership epoch for ``instance_id`` (which must hold the leader lock, or
        be alone on its database); returns the new epoch."""
