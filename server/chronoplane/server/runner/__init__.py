"""The runner: turns fires into executions, claims executions from the queue, runs them, and
records how they ended (docs/decisions/0010-execution-queue.md). One module per phase; this
one wires them and holds the lifecycle. An execution's life, and who moves it::

    fire, TriggerJob, BackfillJob, retry
        │  fires.py (the leader's fires) → admission.py: the overlap policy, against the
        │  job's slots as the database counts them
        ├──────────────► SKIPPED, MISSED (recorded, never run)
        ▼
    PENDING ─ queued (no slot) ── a slot frees (progress) ──► ready
        │  claims.py (any instance with room and the task; or admission.py, in the
        │  insert, for the writer's own share)
        ▼
    RUNNING ── running.py: the task runs, within its timeout ──┐
        │   cancels.py: CancelExecution, anywhere              │
        ▼                                                      ▼
    SUCCEEDED, FAILED, TIMED_OUT, CANCELLED, INTERRUPTED ◄─ outcomes.py records them in
        │                                                     batches, frees the slot
        └─ retries.py: FAILED, TIMED_OUT or ABANDONED, and the policy retries it:
           a new PENDING attempt (admission.py)

    ABANDONED: written by the leader when the instance running it is judged dead
    (cluster.py); the instance, if it comes back, stops it (``disown``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

from chronoplane.server.engine.abc import Fire
from chronoplane.server.executors.abc import Executor
from chronoplane.server.models import Execution, ExecutionState, Job, JSONObject, OverlapPolicy
from chronoplane.server.runner.admission import Admissions
from chronoplane.server.runner.cancels import Cancels
from chronoplane.server.runner.claims import Claimer
from chronoplane.server.runner.fires import Due, Fires
from chronoplane.server.runner.outcomes import Failure, Outcomes, json_result, type_names
from chronoplane.server.runner.retries import Retries, retry_of
from chronoplane.server.runner.running import Running
from chronoplane.server.runner.state import Shared
from chronoplane.server.storage.abc import Store
from chronoplane.server.tasks import TaskRegistry

__all__ = [
    "DEFAULT_MAX_RUNNING",
    "Due",
    "Failure",
    "Runner",
    "json_result",
    "retry_of",
    "type_names",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_RUNNING = 1000
# How long a stopping leader goes on recording the fires it queued.
FLUSH_SECONDS = 3.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Runner:
    def __init__(
        self,
        *,
        store: Store,
        executor: Executor,
        tasks: TaskRegistry,
        instance_id: str,
        max_running: int = DEFAULT_MAX_RUNNING,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        shared = self._shared = Shared(
            store=store, instance_id=instance_id, clock=clock, max_running=max_running
        )
        self._outcomes = Outcomes(shared)
        self._cancels = Cancels(shared, self._outcomes)
        self._retries = Retries(shared)
        self._running = Running(
            shared,
            executor=executor,
            tasks=tasks,
            outcomes=self._outcomes,
            retry=self._retries.retry,
        )
        self._admissions = Admissions(
            shared, running=self._running, cancels=self._cancels, tasks=tasks
        )
        # A retry is an admission, whose claim starts a run, whose failure is retried: the
        # circle closes here.
        self._retries.admit = self._admissions.admit_with_retry
        self._fires = Fires(shared, admissions=self._admissions, outcomes=self._outcomes)
        self._claimer = Claimer(shared, running=self._running, cancels=self._cancels, tasks=tasks)
        self._claiming: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []

    # -- hooks --------------------------------------------------------------------------------

    def on_fenced(self, callback: Callable[[], None]) -> None:
        """``callback`` is called when a claim finds this instance fenced (judged dead): it
        must stop what it runs (``disown``) and register again."""
        self._shared.fenced = callback

    def also_wake(self, listener: Callable[[], None]) -> None:
        """``listener`` is called whenever the claimer is woken: executions may be ready
        (the Celery dispatcher looks at the queue then too)."""
        self._shared.wake.listeners.append(listener)

    def revoke_with(self, revoke: Callable[[str], Awaitable[None]]) -> None:
        """``revoke(task_id)`` stops the Celery task of an execution this server ended
        (cancelled, or displaced by a newer one: CANCEL_RUNNING)."""
        self._shared.revoke = revoke

    # -- leadership ---------------------------------------------------------------------------

    def lead(
        self, epoch: int, acting: Callable[[], bool], relead: Callable[[], None] | None = None
    ) -> None:
        """From now on, write scheduled fires and next run times with ``epoch``, while
        ``acting()`` says the leadership holds; ``relead()`` starts the term again (the
        schedule reloaded from the database) when fires could not be recorded."""
        shared = self._shared
        shared.epoch, shared.acting, shared.relead = epoch, acting, relead

    def follow(self) -> None:
        """No longer leading: fires not yet written are left to the next leader, which finds
        them missing and applies the misfire policy."""
        self._shared.epoch = None
        self._shared.acting = lambda: False
        self._fires.drop()

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the writers. Claiming starts with ``start_claiming``."""
        self._loops = [
            asyncio.create_task(self._fires.write_forever(), name="runner-fires"),
            asyncio.create_task(self._outcomes.write_forever(), name="runner-progress"),
        ]
        for loop in self._loops:
            loop.add_done_callback(_loop_ended)

    def start_claiming(self) -> None:
        """Starts taking executions from the queue (once this instance is registered: the
        leader takes executions of unregistered instances for abandoned)."""
        self._claiming = asyncio.create_task(self._claimer.claim_forever(), name="runner-claims")
        self._claiming.add_done_callback(_loop_ended)

    async def stop(self, grace: float) -> None:
        """Stops claiming, waits up to ``grace`` seconds for running executions, records the
        rest as INTERRUPTED, and writes everything still queued. PENDING executions stay in
        the queue, for another instance or the next start."""
        shared = self._shared
        shared.stopping = True
        shared.wake.set()
        if self._claiming is not None:
            # Not cancelled: a claim cut short after its commit would leave rows claimed.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._claiming), 10.0)
        await self._fires.drain()
        await self._drain_runs(grace)
        await asyncio.gather(*shared.background, return_exceptions=True)
        await self._outcomes.flush()
        loops = [t for t in (*self._loops, self._claiming, self._cancels.task) if t is not None]
        async with self._fires.lock, self._outcomes.lock:
            for loop in loops:
                loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await self._outcomes.flush()

    async def _drain_runs(self, grace: float) -> None:
        """Waits up to ``grace`` for the runs here, then stops the rest (INTERRUPTED)."""
        runs = self._shared.runs
        running = [run.task for run in runs.values() if run.task is not None]
        if running:
            log.info("waiting up to %.0f s for %d running executions", grace, len(running))
            await asyncio.wait(running, timeout=grace)
        for run in list(runs.values()):
            run.request_stop(
                ExecutionState.INTERRUPTED, "the server shut down before the execution finished"
            )
        tasks = [run.task for run in runs.values() if run.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def flush_fires(self) -> None:
        """Records the fires queued so far (the timer has stopped: a leader that stops
        records what it fired before it hands over), for ``FLUSH_SECONDS`` at most: a long
        catch-up would hold the stop up, and what is left the next leader finds missing."""
        await self._fires.drain(deadline=time.monotonic() + FLUSH_SECONDS)

    @property
    def running(self) -> int:
        """How many executions run here now."""
        return len(self._shared.runs)

    @property
    def max_running(self) -> int:
        return self._shared.max_running

    def cluster_size(self, instances: int) -> None:
        """There are ``instances`` live instances: run at most a fair share of what this one
        creates itself (docs/decisions/0010-execution-queue.md)."""
        self._shared.share = max(1, self._shared.max_running // max(1, instances))

    # -- the phases' entry points -------------------------------------------------------------

    def on_fires(self, fires: Sequence[Fire]) -> None:
        """The engine's handler: queue, wake the writer, return at once."""
        self._fires.on_fires(fires)

    def on_due(self, due: Due) -> None:
        """Queues a job's planned catch-up (computed at start-up from the database)."""
        self._fires.on_due(due)

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
        return await self._admissions.trigger(
            job, args=args, request_id=request_id, policy=policy, by=by
        )

    async def backfill(
        self, job: Job, fire_times: Sequence[datetime], *, policy: OverlapPolicy, by: str = ""
    ) -> tuple[list[Execution], int]:
        """Queues the given past fires as BACKFILL executions; returns those created and how
        many had been backfilled before."""
        return await self._admissions.backfill(job, fire_times, policy=policy, by=by)

    async def cancel(self, execution_id: str, *, reason: str, by: str = "") -> Execution:
        """Stops an execution, wherever it runs (cancels.py)."""
        return await self._cancels.cancel(execution_id, reason=reason, by=by)

    def notified(self, writer: str = "") -> None:
        """Executions were made ready (by instance ``writer``): look at the queue."""
        self._claimer.notified(writer)

    def notified_cancel(self, execution_id: str) -> None:
        """Someone asked (through any instance) to stop an execution that may run here."""
        self._cancels.notified(execution_id)

    def retry_abandoned(self, execution: Execution, job: Job) -> bool:
        """Retries an execution a dead instance abandoned, if the job's retry policy says so
        (its error type is chronoplane.Abandoned)."""
        return self._retries.retry_abandoned(execution, job)

    def disown(self, message: str) -> int:
        """Stops every execution running here, at once (running.py)."""
        return self._running.disown(message)


def _loop_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("runner loop %s died", task.get_name(), exc_info=task.exception())
