"""Admission: new executions become rows. A TriggerJob or BackfillJob call, a retry, or the
leader's scheduled fires (fires.py) are written as PENDING in the queue, or as a SKIPPED or
MISSED record, as the job's overlap policy decides against its slots as the database counts
them (docs/decisions/0010-execution-queue.md). What the writer may run itself, within its
share of the cluster's room, it claims in the same insert and starts at once."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from chronoplane.server import metrics, tracing
from chronoplane.server.aio import GroupCommit
from chronoplane.server.errors import ChronoplaneError, JobNotFound, NotLeader, TaskNotRegistered
from chronoplane.server.ids import new_execution_id
from chronoplane.server.logs import Outage, brief
from chronoplane.server.models import (
    FINAL_STATES,
    SCHEDULE_PRINCIPAL,
    Execution,
    ExecutionSource,
    ExecutionState,
    ExecutorKind,
    Job,
    JSONObject,
    OverlapPolicy,
    evolve,
)
from chronoplane.server.runner.cancels import Cancels
from chronoplane.server.runner.outcomes import backoff
from chronoplane.server.runner.running import Running
from chronoplane.server.runner.state import Run, Shared
from chronoplane.server.storage.abc import DISPLACED, Admission, Admitted
from chronoplane.server.tasks import TaskRegistry

__all__ = ["STOP_RETRY_SECONDS", "WRITE_RETRY_SECONDS", "Admissions"]

log = logging.getLogger("chronoplane.server.runner")

# A write that fails with an error that is not the database's (a bug) is retried this long.
WRITE_RETRY_SECONDS = 60.0
# A retry that cannot be recorded while the server stops is given up (loudly) after this long.
STOP_RETRY_SECONDS = 10.0


class Admissions:
    def __init__(
        self, shared: Shared, *, running: Running, cancels: Cancels, tasks: TaskRegistry
    ) -> None:
        self._shared = shared
        self._running = running
        self._cancels = cancels
        self._tasks = tasks
        # Concurrent TriggerJobs share a transaction, as a leader's fires do.
        self._triggers: GroupCommit[Admission, Execution | None] = GroupCommit(
            self._admit_each, name="trigger-admissions"
        )
        self._outage = Outage(
            log,
            "recording new executions failed (trying again)",
            "new executions are recorded again",
        )

    def runnable(self, job: Job) -> bool:
        """Whether the job's task can run: registered here, or sent to Celery (whose
        workers have their own registry)."""
        return job.executor is ExecutorKind.CELERY or job.task in self._tasks

    def new_execution(
        self,
        job: Job,
        source: ExecutionSource,
        scheduled: datetime,
        now: datetime,
        *,
        by: str = SCHEDULE_PRINCIPAL,
    ) -> Execution:
        return Execution(
            id=new_execution_id(),
            job_id=job.id,
            state=ExecutionState.PENDING,
            source=source,
            scheduled_time=scheduled,
            create_time=now,
            task=job.task,
            args=job.args,
            # Who recorded it; the store leaves it empty while the execution is queued.
            instance_id=self._shared.instance_id,
            triggered_by=by,
            executor=job.executor,
            # The RPC's, for a manual run or a backfill; a fire has none.
            trace_parent=tracing.current_parent(),
        )

    # -- manual runs and backfills ------------------------------------------------------------

    async def trigger(
        self,
        job: Job,
        *,
        args: JSONObject | None,
        request_id: str,
        policy: OverlapPolicy | None = None,
        by: str = "",
    ) -> Execution:
        """Queues (or skips) a manual execution of ``job`` now, asked for by ``by``."""
        store = self._shared.store
        if not self.runnable(job):
            raise TaskNotRegistered(job.task)
        if request_id:
            existing = await store.get_execution_by_request_id(job.id, request_id)
            if existing is not None:
                return existing
        now = self._shared.clock()
        execution = evolve(
            self.new_execution(job, ExecutionSource.MANUAL, now, now, by=by),
            args=job.args if args is None else args,
            request_id=request_id,
        )
        # Asked for explicitly, ALLOW means "run it now, whatever is running".
        admission = Admission(
            execution=execution,
            due_time=now,
            policy=policy or job.overlap_policy,
            force=policy is OverlapPolicy.ALLOW,
        )
        inserted = await self._triggers.submit(admission)
        if inserted is None:
            # The job is gone, or a call with the same request_id came first.
            existing = await store.get_execution_by_request_id(job.id, request_id)
            if existing is None:
                raise JobNotFound(job.id)
            return existing
        return inserted

    async def backfill(
        self, job: Job, fire_times: Sequence[datetime], *, policy: OverlapPolicy, by: str = ""
    ) -> tuple[list[Execution], int]:
        """Queues the given past fires as BACKFILL executions; returns those created and how
        many had been backfilled before."""
        if not self.runnable(job):
            raise TaskNotRegistered(job.task)
        now = self._shared.clock()
        admitted = await self._admit(
            [
                Admission(
                    execution=self.new_execution(job, ExecutionSource.BACKFILL, t, now, by=by),
                    due_time=now,
                    policy=policy,
                )
                for t in fire_times
            ]
        )
        return admitted.inserted, len(fire_times) - len(admitted.inserted)

    # -- writing ------------------------------------------------------------------------------

    async def _admit_each(self, admissions: list[Admission]) -> list[Execution | None]:
        """``_admit``, with each admission's execution as written (None: not written)."""
        admitted = await self._admit(admissions)
        inserted = {execution.id: execution for execution in admitted.inserted}
        return [inserted.get(admission.execution.id) for admission in admissions]

    async def _admit(self, admissions: list[Admission]) -> Admitted:
        """Writes admissions made for a call (a trigger, a backfill), running here what this
        instance may of them."""
        shared = self._shared
        admitted = await shared.store.admit_executions(
            admissions, claim_for=shared.instance_id, claim_limit=shared.room_here()
        )
        self._admitted(admitted)
        return admitted

    async def admit_with_retry(
        self, admissions: list[Admission], *, epoch: int | None = None
    ) -> Admitted | None:
        """Writes the admissions, trying again whatever went wrong: a leader's fires (with
        ``epoch``) for as long as it leads, a retry until the server stops. Every attempt
        writes the same executions, whose dedupe keys make a repeat of an attempt that did
        commit (its answer lost with the connection) a no-op. None when given up: fenced,
        no longer leading (the next leader finds the fires missing and applies the misfire
        policy), stopping, or an error that is not the database's for longer than
        ``WRITE_RETRY_SECONDS`` (then the leader takes up its term again, which records the
        fires from the database: run or MISSED, never nothing)."""
        shared = self._shared
        delays = backoff()
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            if epoch is not None and (epoch != shared.epoch or not shared.acting()):
                log.warning("no longer leading: %d fires left to the leader", len(admissions))
                return None
            try:
                admitted = await shared.store.admit_executions(
                    admissions,
                    epoch=epoch,
                    claim_for=shared.instance_id,
                    claim_limit=0 if shared.stopping else shared.room_here(),
                )
            except NotLeader as error:
                log.warning("%s: %d fires left to the leader", error, len(admissions))
                return None
            except Exception as error:
                if self._give_up(error, len(admissions), loop.time() - started, epoch):
                    return None
                await asyncio.sleep(next(delays))
                continue
            self._outage.ok()
            self._admitted(admitted)
            return admitted

    def _give_up(self, error: Exception, count: int, waited: float, epoch: int | None) -> bool:
        """Whether a failed write of ``count`` admissions is given up (logged either way)."""
        shared = self._shared
        if isinstance(error, ChronoplaneError):  # the database's: worth waiting for
            self._outage.failed(error)
            if not (shared.stopping and epoch is None and waited > STOP_RETRY_SECONDS):
                return False
        else:
            log.exception("recording %d executions failed", count, exc_info=error)
            if waited < WRITE_RETRY_SECONDS and not shared.stopping:
                return False
            if epoch is not None and shared.relead is not None:
                log.error(
                    "gave up recording %d fires after %.0f s: taking up the term again, which "
                    "records them from the database",
                    count,
                    waited,
                )
                shared.relead()
                return True
        log.error("gave up recording %d executions after %.0f s: %s", count, waited, error)
        return True

    def _admitted(self, admitted: Admitted) -> None:
        """After an admission: what was claimed for this instance starts, the claimer looks
        at the queue, and runs displaced by newer ones (CANCEL_RUNNING) are asked to stop."""
        shared = self._shared
        if admitted.fenced:
            shared.fenced()
        _count(admitted.inserted)
        for execution, policy in admitted.claimed:
            started = execution.start_time or shared.clock()
            self._running.launch(Run(execution=execution, policy=policy, started=started))
        pending = [e for e in admitted.inserted if e.state is ExecutionState.PENDING]
        if any(e.executor is ExecutorKind.INLINE for e in pending):
            shared.wake.set()
        elif pending:
            # The claimer takes inline executions only: a claim for these would find nothing.
            shared.wake.tell_listeners()
        if admitted.displace:
            shared.spawn(self._displace(admitted.displace))

    async def _displace(self, job_ids: list[str]) -> None:
        shared = self._shared
        try:
            displaced = await shared.store.displace_oldest(job_ids, now=shared.clock())
        except ChronoplaneError as error:
            log.warning("could not stop runs displaced by newer ones: %s", brief(error))
            return
        for execution in displaced:
            if execution.executor is ExecutorKind.CELERY:
                await self._cancels.revoke(execution)
                continue
            run = shared.runs.get(execution.id)
            if run is not None:  # the others' instances are told by the database
                run.request_stop(ExecutionState.CANCELLED, DISPLACED)


def _count(inserted: list[Execution]) -> None:
    """The metrics of what an admission wrote (metrics.py), a counter step per kind and
    task, not per execution: a leader's batch can be thousands of fires."""
    counts: Counter[tuple[str, ExecutionSource, ExecutionState, ExecutorKind]] = Counter()
    missed: Counter[str] = Counter()
    for e in inserted:
        counts[e.task, e.source, e.state, e.executor] += 1
        if e.missed is not None:
            missed[e.task] += e.missed.count
    scheduling = metrics.scheduling
    for (task, source, state, executor), count in counts.items():
        if source is ExecutionSource.SCHEDULE and state is not ExecutionState.MISSED:
            scheduling.fired(task, count)
        elif source in (ExecutionSource.MANUAL, ExecutionSource.BACKFILL):
            scheduling.manual(task, count)
        elif source is ExecutionSource.RETRY:
            scheduling.retried(task, count)
        if state is ExecutionState.SKIPPED:
            scheduling.skipped_fires(task, count)
        # Final from the start; a Celery one's end the leader counts (census.py).
        if state in FINAL_STATES and executor is ExecutorKind.INLINE:
            scheduling.ended(task, state.value, executor.value, count)
    for task, count in missed.items():
        scheduling.missed_fires(task, count)
