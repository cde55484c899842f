"""Executions: their queue, slots and claims, progress and history."""

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
    ExecutorKind,
    OverlapPolicy,
    RunPolicy,
)

__all__ = [
    "DISPLACED",
    "Admission",
    "Admitted",
    "CancelRequest",
    "Claim",
    "EndedCount",
    "ExecutionFinish",
    "ExecutionStore",
    "NextRun",
    "Progress",
    "QueueDepth",
    "SlotRelease",
]


# The error message of a run stopped for a newer one (overlap policy CANCEL_RUNNING).
DISPLACED = "cancelled for a newer run (overlap policy cancel_running)"


@dataclass(frozen=True, kw_only=True)
class QueueDepth:
    """The cluster's queue at one moment (``queue_depth``)."""

    pending: int
    running: int
    oldest_due: datetime | None
    """The earliest due time of a PENDING execution that is due; None when none is."""


@dataclass(frozen=True, kw_only=True)
class EndedCount:
    """How many executions of a task ended in a state (``count_ended``)."""

    state: ExecutionState
    task: str
    count: int


@dataclass(frozen=True, kw_only=True)
class Admission:
    """A new execution, with what decides whether and when it may run.

    A job has ``max_concurrent`` slots: an execution takes one when it becomes ready and
    keeps it while it runs (``holds_slot``), until its task has really ended."""

    execution: Execution
    due_time: datetime | None = None
    """When a PENDING one may be claimed; None means its scheduled time."""
    policy: OverlapPolicy | None = None
    """The overlap policy that admits a PENDING one (scheduling.admit); None inserts it as
    it is (a final record, say, or a retry that waits its turn)."""
    force: bool = False
    """Claimed whatever the job's slots say (TriggerJob with overlap ALLOW)."""
    epoch: int | None = None
    """The leadership term of the leader writing a scheduled fire (recorded only)."""


@dataclass(frozen=True, kw_only=True)
class Admitted:
    """What ``admit_executions`` wrote."""

    inserted: list[Execution]
    """The executions inserted, in the state their admission gave them."""
    displace: list[str]
    """Jobs whose oldest running execution should stop for a newer one (CANCEL_RUNNING):
    see ``displace_oldest``."""
    claimed: list[tuple[Execution, RunPolicy]]
    """The inserted executions claimed for the writer (``claim_for``): RUNNING there."""
    fenced: bool = False
    """The writer may claim nothing: it was judged dead (``abandon_instances``)."""


@dataclass(frozen=True, kw_only=True)
class Claim:
    """What ``claim_executions`` took: executions now RUNNING here, with their jobs."""

    executions: list[tuple[Execution, RunPolicy]]
    next_due_in: timedelta | None
    """How long until the next PENDING execution of these tasks becomes due, if any is
    waiting (by the database's clock)."""
    fenced: bool = False
    """Nothing was claimed: this instance was judged dead (``abandon_instances``) and must
    stop what it runs and register again."""


@dataclass(frozen=True, kw_only=True)
class ExecutionFinish:
    """A RUNNING (or unclaimed PENDING) execution reached a final state."""

    id: str
    job_id: str
    state: ExecutionState
    start_time: datetime | None
    end_time: datetime
    result: Any = None
    error_message: str = ""
    error_traceback: str = ""
    error_type: str = ""
    keeps_slot: bool = False
    """Its task still runs (a synchronous one past its timeout or cancelled): the slot stays
    held until a ``SlotRelease``."""
    cancelled_by: str = ""
    """Who cancelled it, when CancelExecution reached the instance running it; empty keeps
    what the cancel request recorded."""


@dataclass(frozen=True, kw_only=True)
class SlotRelease:
    """A task that outlived its execution's final state has ended: its slot is free, and
    ``note`` says what it did."""

    id: str
    job_id: str
    note: str


@dataclass(frozen=True, kw_only=True)
class Progress:
    """What ``record_progress`` did."""

    moved: bool
    """False when next run times were refused (the epoch was not the current one)."""
    readied: int
    """Queued executions that got a slot freed by these final states."""


@dataclass(frozen=True, kw_only=True)
class CancelRequest:
    """What ``request_cancel`` did."""

    execution: Execution
    """The execution after the request."""
    done: bool
    """True: it was PENDING and is CANCELLED now. False: it runs on ``execution.instance_id``,
    which was asked to stop it."""


@dataclass(frozen=True, kw_only=True)
class NextRun:
    """The engine moved a job's next fire time; applies only if the job is still at version."""

    job_id: str
    version: int
    next_run_time: datetime | None


class ExecutionStore(ABC):
    """Executions: admitted into the queue (or recorded SKIPPED, MISSED), claimed, ended,
    and kept as history (docs/decisions/0010-execution-queue.md)."""

    @abstractmethod
    async def admit_executions(
        self,
        admissions: Sequence[Admission],
        *,
        epoch: int | None = None,
        claim_for: str = "",
        claim_limit: int = 0,
    ) -> Admitted:
        """Inserts executions in one transaction.

        Each PENDING one is admitted by its ``policy`` (``scheduling.admit``; None is
        BUFFER_ALL) against its job's slots as the database counts them, other writers of
        the same jobs kept out meanwhile: it becomes SKIPPED, or it waits, *ready* (it has a
        slot; any instance may claim it once due) or *queued* (until a slot frees), and
        may want the job's oldest running execution stopped (CANCEL_RUNNING; the caller
        asks with ``displace_oldest`` once this has committed). A forced one is
        ready at once. An execution whose (job, scheduled fire) or (job, request_id) already
        has one is not inserted; neither is one whose job no longer exists. Up to
        ``claim_limit`` of the ready ones that are due at once are claimed for ``claim_for``
        as they are inserted (the writer runs them itself). With ``epoch``
        (a leader's scheduled fires), raises ``NotLeader`` and writes nothing unless it is
        the current leadership epoch. Wakes the cluster's claimers when something is ready.
        """

    async def insert_executions(
        self, executions_: Sequence[Execution], *, epoch: int | None = None
    ) -> set[str]:
        """Inserts executions as they are (no overlap decision); returns the ids inserted."""
        admitted = await self.admit_executions(
            [Admission(execution=e) for e in executions_], epoch=epoch
        )
        return {e.id for e in admitted.inserted}

    @abstractmethod
    async def claim_executions(
        self, *, instance_id: str, limit: int, tasks: Sequence[str]
    ) -> Claim:
        """Takes up to ``limit`` ready executions of ``tasks`` that are due, oldest due first,
        for ``instance_id``: RUNNING from now, each holding its slot. Several instances may
        claim at once; none takes what another took, and none waits for another."""

    @abstractmethod
    async def record_progress(
        self,
        finishes: Sequence[ExecutionFinish],
        releases: Sequence[SlotRelease] = (),
        next_runs: Sequence[NextRun] = (),
        *,
        epoch: int | None = None,
    ) -> Progress:
        """Applies final states, frees slots and moves next run times, in one transaction.
        A final state for an execution that is already final (or gone) is ignored: the first
        final state wins. Queued executions of the jobs whose slots were freed become
        ready, and the cluster's claimers are woken. With ``epoch``, next run times are
        moved only while it is the current leadership epoch."""

    @abstractmethod
    async def displace_oldest(self, job_ids: Sequence[str], *, now: datetime) -> list[Execution]:
        """Asks each job's oldest running execution (not already asked) to stop for a newer
        one; returns them as they now are. Inline ones are asked through their instances (by
        notification); a Celery one is CANCELLED at once, its slot freed, and the caller
        revokes its task."""

    @abstractmethod
    async def promote_waiting(self) -> int:
        """Makes ready every queued execution whose job has a free slot; returns how many.
        The safety net for an admission that raced with the end of a run of its job."""

    @abstractmethod
    async def request_cancel(
        self, execution_id: str, *, message: str, now: datetime, by: str = ""
    ) -> CancelRequest:
        """Cancels a PENDING execution at once, or asks the instance running a RUNNING one to
        stop it with ``message`` (kept until it does); ``by`` is who asks (cancelled_by, once
        it ends CANCELLED).

        Raises ``ExecutionNotFound``, or ``ExecutionFinished`` when it had already ended.
        """

    @abstractmethod
    async def cancel_requests(self, execution_ids: Sequence[str]) -> dict[str, str]:
        """Which of these RUNNING executions someone asked to stop, with the message."""

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
    async def queue_depth(self, *, now: datetime) -> QueueDepth:
        """How many executions are PENDING and RUNNING, and the earliest due time of those
        PENDING at ``now``; from indexes, in time proportional to the queue, never to the
        history."""

    @abstractmethod
    async def count_ended(
        self, *, executor: ExecutorKind, after: datetime, until: datetime
    ) -> list[EndedCount]:
        """How many executions of ``executor`` ended (end time) in ``(after, until]``, by
        state and task; from the end time's index."""

    @abstractmethod
    async def interrupt_unfinished(self, *, message: str, now: datetime) -> int:
        """Marks every RUNNING execution INTERRUPTED and frees every slot (a server alone on
        its database, starting after a crash); PENDING ones stay queued. Returns how many."""

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
