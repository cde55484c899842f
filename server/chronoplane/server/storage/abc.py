"""The storage contract. One implementation per database technology; one test suite for all."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from chronoplane.server.models import (
    AuditEvent,
    AuditPage,
    AuditQuery,
    CeleryOptions,
    Event,
    EventWindow,
    Execution,
    ExecutionPage,
    ExecutionQuery,
    ExecutionState,
    Instance,
    Job,
    JobPage,
    OverlapPolicy,
    RunPolicy,
    SnapshotPoint,
    StoredToken,
)

__all__ = [
    "DISPLACED",
    "Admission",
    "Admitted",
    "CancelRequest",
    "Claim",
    "Dispatch",
    "DispatchClaim",
    "ExecutionFinish",
    "NextRun",
    "Progress",
    "SlotRelease",
    "Store",
]


# The error message of a run stopped for a newer one (overlap policy CANCEL_RUNNING).
DISPLACED = "cancelled for a newer run (overlap policy cancel_running)"


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
class Dispatch:
    """A Celery execution claimed to be sent: its job's routing and timeout."""

    execution: Execution
    options: CeleryOptions
    timeout: timedelta | None


@dataclass(frozen=True, kw_only=True)
class DispatchClaim:
    dispatches: list[Dispatch]
    next_due_in: timedelta | None
    fenced: bool = False
    """Nothing was claimed: this instance was judged dead."""


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
        """Inserts (or refreshes) the instance's row, not fenced; last seen now."""

    @abstractmethod
    async def heartbeat_instance(
        self, instance_id: str, *, running: int, live_after: timedelta, draining: bool = False
    ) -> int:
        """Marks the instance seen now, running ``running`` executions (and ``draining``);
        returns how many instances were seen within ``live_after`` (this one included), or 0
        if its row is gone or fenced (it was taken for dead: it must stop what it runs and
        register again)."""

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
    async def instance_heartbeats(self) -> dict[str, datetime]:
        """The last heartbeat (database time) of every instance that is not fenced."""

    @abstractmethod
    async def execution_owners(self) -> set[str]:
        """The instances that run executions or hold slots."""

    @abstractmethod
    async def abandon_instances(
        self,
        silent: Mapping[str, datetime | None],
        *,
        message: str,
        now: datetime,
        epoch: int | None = None,
    ) -> list[Execution]:
        """Fences each instance of ``silent`` whose last heartbeat is still the one given
        (None: that is still not registered), unless it heartbeat or registered meanwhile;
        then the RUNNING executions of every fenced instance become ABANDONED with
        ``message``, and every slot one held is freed. With ``epoch``, only while it is the
        leadership's (``NotLeader``). Returns the executions abandoned.

        A fenced instance can no longer heartbeat or claim: whichever of the fence and its
        own write comes first wins, so an execution it claims is never abandoned while it
        believes itself alive, nor claimed after it was judged dead."""

    @abstractmethod
    async def take_leadership(self, instance_id: str) -> int:
        """Bumps the leadership epoch for ``instance_id`` (which must hold the leader lock, or
        be alone on its database); returns the new epoch."""

    # -- the watch history (docs/decisions/0011-watch-events.md) --------------------------------
    # Every method above that changes an execution's state or outcome, or creates, changes or
    # deletes a job, appends an event in its own transaction.

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

    # -- API tokens ---------------------------------------------------------------------------

    @abstractmethod
    async def create_token(self, token: StoredToken) -> None:
        """Raises ``AlreadyExists`` if a token has that name."""

    @abstractmethod
    async def get_token(self, token_id: str) -> StoredToken | None: ...

    @abstractmethod
    async def list_tokens(self) -> list[StoredToken]:
        """Every token, by name."""

    @abstractmethod
    async def revoke_token(self, name: str, *, now: datetime) -> StoredToken | None:
        """Marks the named token revoked (once); returns it, or None if there is none."""

    # -- Celery dispatch ----------------------------------------------------------------------

    @abstractmethod
    async def claim_dispatches(self, *, instance_id: str, limit: int) -> DispatchClaim:
        """Takes up to ``limit`` due, ready Celery executions to send: still PENDING, their
        slots held, this instance's until ``record_dispatches`` says how sending went."""

    @abstractmethod
    async def record_dispatches(
        self,
        *,
        instance_id: str,
        sent: Sequence[tuple[str, datetime]],
        failed: Sequence[tuple[str, str, datetime]],
    ) -> None:
        """``sent``: (id, when); ``failed``: (id, reason, when to try again)."""

    @abstractmethod
    async def start_dispatched(
        self, execution_id: str, *, worker: str, lease_until: datetime
    ) -> tuple[Execution, RunPolicy] | None: ...

    @abstractmethod
    async def renew_lease(self, execution_id: str, *, worker: str, until: datetime) -> bool:
        """False when the execution is no longer RUNNING on ``worker``."""

    @abstractmethod
    async def abandon_expired_leases(self, *, message: str) -> list[Execution]:
        """RUNNING Celery executions whose worker's lease ran out: ABANDONED."""

    # -- the audit log ------------------------------------------------------------------------

    @abstractmethod
    async def record_audit(self, event: AuditEvent) -> None:
        """Appends one audit event (its id is the store's)."""

    @abstractmethod
    async def list_audit_events(
        self, query: AuditQuery, *, before: int | None, limit: int
    ) -> AuditPage:
        """Matching events, newest first, with ids below ``before``."""

    @abstractmethod
    async def purge_audit_events(self, *, before: datetime) -> int:
        """Deletes the events recorded before ``before``; returns how many."""
