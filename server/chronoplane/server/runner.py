"""The runner: turns fires into queued executions, claims executions from the queue, runs
them, and records how they ended (docs/decisions/0010-execution-queue.md).

*Admission.* Scheduled fires (on the leader), TriggerJob and BackfillJob calls and retries
become rows: PENDING in the queue, or a SKIPPED or MISSED record, as the job's overlap policy
decides against its slots as the database counts them. Fires that come while a batch is being
written go in the next one (group commit, no timer), so a burst costs a few transactions.

*Running.* Every instance claims due executions of the tasks it has, up to ``max_running``
at once, and runs them; final states are written in batches the same way. A claimed
execution holds a slot of its job until its code has really ended: a synchronous task that
timed out or was cancelled keeps its slot until its thread returns; its final state is
recorded at once, its late outcome as a note.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import traceback
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from chronoplane.server.engine.abc import Fire
from chronoplane.server.errors import (
    CancellationPending,
    ChronoplaneError,
    ExecutionFinished,
    JobNotFound,
    NotLeader,
    TaskNotRegistered,
)
from chronoplane.server.executors.abc import Executor, Work
from chronoplane.server.ids import new_execution_id
from chronoplane.server.models import (
    ABANDONED_ERROR_TYPE,
    SCHEDULE_PRINCIPAL,
    Execution,
    ExecutionSource,
    ExecutionState,
    ExecutorKind,
    Job,
    JSONObject,
    MissedFires,
    OverlapPolicy,
    RetryPolicy,
    RunPolicy,
)
from chronoplane.server.scheduling import jitter_delay, plan_fires
from chronoplane.server.storage.abc import (
    DISPLACED,
    Admission,
    Admitted,
    ExecutionFinish,
    NextRun,
    SlotRelease,
    Store,
)
from chronoplane.server.tasks import ExecutionContext, TaskRegistry, execution_context

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
MAX_BATCH = 2_000
MAX_RESULT_BYTES = 1 << 20
MAX_TRACEBACK_CHARS = 64 * 1024
MAX_NOTE_CHARS = 4 * 1024
# A batch that fails with an error that is not the database's (a bug) is retried this long.
WRITE_RETRY_SECONDS = 60.0
# A retry that cannot be recorded while the server stops is given up (loudly) after this long.
STOP_RETRY_SECONDS = 10.0
# Claims are also tried this often, whatever notifications say: the safety net.
CLAIM_POLL_SECONDS = 1.0
# CancelExecution of a run on another instance waits this long for that instance to stop it.
CANCEL_WAIT_SECONDS = 10.0
# An async task that ignores its cancellation gets this long before it is left running.
CANCEL_GRACE_SECONDS = 5.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _backoff() -> Iterator[float]:
    """Waits between attempts at a write that failed: at once (a connection that died is
    usually alone: the next one works), then doubling from 50 ms to a second; fires wait
    behind the write, so it is tried often."""
    yield 0.0
    delay = 0.05
    while True:
        yield delay
        delay = min(delay * 2, 1.0)


def json_result(value: Any) -> Any:
    """What a task returned, as JSON, or ValueError saying why it cannot be stored."""
    if value is None:
        return None
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the task returned a value that is not JSON: {error}") from None
    if len(text) > MAX_RESULT_BYTES:
        raise ValueError(f"the task returned {len(text)} bytes of JSON; the limit is 1 MiB")
    return json.loads(text)


def type_names(error: BaseException) -> tuple[str, ...]:
    """The qualified names of the error's class and its bases, most specific first."""
    return tuple(
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in type(error).__mro__
        if cls not in (object, BaseException)
    )


def _stamp(value: datetime) -> str:
    """A fire time as people read it: UTC, to the second (more only when it has more)."""
    text = value.astimezone(UTC).isoformat(
        timespec="milliseconds" if value.microsecond else "seconds"
    )
    return text.replace("+00:00", "Z")


def _seconds(value: timedelta) -> str:
    return f"{value.total_seconds():g} s"


@dataclass(frozen=True)
class Failure:
    """How an execution's failure is recorded: the message, the traceback (its end), the
    qualified type names (most specific first) that retry_on matches."""

    message: str
    traceback: str
    types: tuple[str, ...]

    @property
    def type(self) -> str:
        return self.types[0] if self.types else ""

    @classmethod
    def of(cls, error: BaseException) -> Failure:
        return cls(
            message=f"{type(error).__name__}: {error}",
            traceback="".join(traceback.format_exception(error))[-MAX_TRACEBACK_CHARS:],
            types=type_names(error),
        )


def retry_of(
    execution: Execution, policy: RetryPolicy, *, now: datetime, instance_id: str
) -> Execution:
    """The next attempt of a failed execution: PENDING, due once its backoff has passed."""
    return replace(
        execution,
        id=new_execution_id(),
        state=ExecutionState.PENDING,
        source=ExecutionSource.RETRY,
        scheduled_time=now + policy.backoff(execution.attempt),
        create_time=now,
        instance_id=instance_id,
        start_time=None,
        end_time=None,
        result=None,
        error_message="",
        error_traceback="",
        request_id="",
        attempt=execution.attempt + 1,
        first_execution_id=execution.first_execution_id or execution.id,
        error_type="",
        missed=None,
        note="",
        cancelled_by="",
        celery_task_id="",
        worker="",
        pending_reason="",
        dispatch_time=None,
    )


@dataclass(frozen=True, kw_only=True)
class Due:
    """What a job's fires came to: the plan's runs and missed summary, and the fire after."""

    job: Job
    run: list[datetime]
    missed: MissedFires | None
    next_run_time: datetime | None
    noticed_time: datetime


@dataclass(eq=False)
class _Run:
    """An execution this instance claimed and runs."""

    execution: Execution
    policy: RunPolicy
    started: datetime
    stop: asyncio.Future[tuple[ExecutionState, str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[None] | None = None
    work: Work | None = None
    final: ExecutionState | None = None
    finalized: asyncio.Event = field(default_factory=asyncio.Event)
    # Who asked, through CancelExecution here, to cancel it.
    cancelled_by: str = ""

    @property
    def id(self) -> str:
        return self.execution.id


class _Alarm(asyncio.Event):
    """An event that also tells its listeners when it is set."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[Callable[[], None]] = []

    def set(self) -> None:
        super().set()
        for listener in self.listeners:
            listener()


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
        self._store = store
        self._executor = executor
        self._tasks = tasks
        self._instance_id = instance_id
        self._max_running = max_running
        self._clock = clock
        self._due: deque[Due] = deque()
        self._due_ready = asyncio.Event()
        # Held while a batch is written, so that stop() never cancels a write half-way.
        self._fire_lock = asyncio.Lock()
        self._progress_lock = asyncio.Lock()
        self._finishes: dict[str, ExecutionFinish] = {}
        self._releases: dict[str, SlotRelease] = {}
        self._next_runs: dict[str, NextRun] = {}
        self._progress_ready = asyncio.Event()
        # Executions claimed here, by id, and synchronous tasks that outlived their
        # execution's final state: both take room of max_running.
        self._runs: dict[str, _Run] = {}
        self._lingering = 0
        # How many executions this instance runs at most of those it creates itself (its
        # share of the cluster's room; the rest go to whoever claims them first).
        self._share = max_running
        self._wake = _Alarm()
        # Whether ready executions may be waiting for room here (a claim was full).
        self._backlog = False
        self._next_due: float | None = None
        self._claimer: asyncio.Task[None] | None = None
        self._cancels: asyncio.Task[None] | None = None
        self._cancels_again = False
        self._background: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        # Scheduled fires and next run times are written only while leading, with the epoch.
        self._epoch: int | None = None
        self._acting: Callable[[], bool] = lambda: False
        self._revoke: Callable[[str], Awaitable[None]] | None = None
        # Called when fires could not be recorded: the leader takes up its term again.
        self._relead: Callable[[], None] | None = None
        # Called when a claim finds this instance fenced.
        self._fenced: Callable[[], None] = lambda: None

    def on_fenced(self, callback: Callable[[], None]) -> None:
        """``callback`` is called when a claim finds this instance fenced (judged dead): it
        must stop what it runs (``disown``) and register again."""
        self._fenced = callback

    def disown(self, message: str) -> int:
        """Stops every execution running here, at once: this instance may have been taken
        for dead and its executions given to others. An async task is cancelled before it
        can take another step (called from a plain callback, this takes effect before any
        task resumes); a synchronous one cannot be, and runs on in its thread, its outcome
        kept as a note. Their final state is INTERRUPTED with ``message``, unless they were
        ABANDONED already. Returns how many."""
        for run in self._runs.values():
            if run.work is not None:
                run.work.cancel()
            self._request_stop(run, ExecutionState.INTERRUPTED, message)
        return len(self._runs)

    def also_wake(self, listener: Callable[[], None]) -> None:
        """``listener`` is called whenever the claimer is woken: executions may be ready
        (the Celery dispatcher looks at the queue then too)."""
        self._wake.listeners.append(listener)

    def revoke_with(self, revoke: Callable[[str], Awaitable[None]]) -> None:
        """``revoke(task_id)`` stops the Celery task of an execution this server ended
        (cancelled, or displaced by a newer one: CANCEL_RUNNING)."""
        self._revoke = revoke

    # -- leadership ---------------------------------------------------------------------------

    def lead(
        self, epoch: int, acting: Callable[[], bool], relead: Callable[[], None] | None = None
    ) -> None:
        """From now on, write scheduled fires and next run times with ``epoch``, while
        ``acting()`` says the leadership holds; ``relead()`` starts the term again (the
        schedule reloaded from the database) when fires could not be recorded."""
        self._epoch = epoch
        self._acting = acting
        self._relead = relead

    def follow(self) -> None:
        """No longer leading: fires not yet written are left to the next leader, which finds
        them missing and applies the misfire policy."""
        self._epoch = None
        self._acting = lambda: False
        dropped = sum(len(due.run) for due in self._due)
        self._due.clear()
        if dropped:
            log.warning("left %d unwritten fires to the next leader", dropped)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Starts the writers. Claiming starts with ``start_claiming``."""
        self._loops = [
            asyncio.create_task(self._write_fires_forever(), name="runner-fires"),
            asyncio.create_task(self._write_progress_forever(), name="runner-progress"),
        ]
        for loop in self._loops:
            loop.add_done_callback(self._loop_ended)

    def start_claiming(self) -> None:
        """Starts taking executions from the queue (once this instance is registered: the
        leader takes executions of unregistered instances for abandoned)."""
        self._claimer = asyncio.create_task(self._claim_forever(), name="runner-claims")
        self._claimer.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("runner loop %s died", task.get_name(), exc_info=task.exception())

    async def stop(self, grace: float) -> None:
        """Stops claiming, waits up to ``grace`` seconds for running executions, records the
        rest as INTERRUPTED, and writes everything still queued. PENDING executions stay in
        the queue, for another instance or the next start."""
        self._stopping = True
        self._wake.set()
        if self._claimer is not None:
            # Not cancelled: a claim cut short after its commit would leave rows claimed.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._claimer), 10.0)
        await self._drain_fires()
        running = [run.task for run in self._runs.values() if run.task is not None]
        if running:
            log.info("waiting up to %.0f s for %d running executions", grace, len(running))
            await asyncio.wait(running, timeout=grace)
        for run in list(self._runs.values()):
            self._request_stop(
                run,
                ExecutionState.INTERRUPTED,
                "the server shut down before the execution finished",
            )
        tasks = [run.task for run in self._runs.values() if run.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._flush_progress()
        async with self._fire_lock, self._progress_lock:
            for loop in (*self._loops, self._claimer, self._cancels):
                if loop is not None:
                    loop.cancel()
        await asyncio.gather(
            *(t for t in (*self._loops, self._claimer, self._cancels) if t is not None),
            return_exceptions=True,
        )
        await self._flush_progress()

    async def flush_fires(self) -> None:
        """Records the fires queued so far (the timer has stopped: a leader that stops
        records what it fired before it hands over)."""
        await self._drain_fires()

    @property
    def running(self) -> int:
        """How many executions run here now."""
        return len(self._runs)

    @property
    def max_running(self) -> int:
        return self._max_running

    def cluster_size(self, instances: int) -> None:
        """There are ``instances`` live instances: run at most a fair share of what this one
        creates itself (docs/decisions/0010-execution-queue.md)."""
        self._share = max(1, self._max_running // max(1, instances))

    def _room_here(self) -> int:
        """How many executions it creates this instance may run itself, now."""
        busy = len(self._runs) + self._lingering
        return max(0, min(self._max_running, self._share) - busy)

    # -- scheduled fires ----------------------------------------------------------------------

    def on_fires(self, fires: Sequence[Fire]) -> None:
        """The engine's handler: queue, wake the writer, return at once."""
        if self._stopping or not fires:
            return
        by_job: dict[str, list[Fire]] = defaultdict(list)
        for fire in fires:
            by_job[fire.job.id].append(fire)
        for job_fires in by_job.values():
            job = job_fires[-1].job
            now = job_fires[-1].noticed_time
            plan = plan_fires(job, [f.scheduled_time for f in job_fires], now=now)
            self._due.append(
                Due(
                    job=job,
                    run=plan.run,
                    missed=plan.missed,
                    next_run_time=job_fires[-1].next_run_time,
                    noticed_time=now,
                )
            )
        self._due_ready.set()

    def on_due(self, due: Due) -> None:
        """Queues a job's planned catch-up (computed at start-up from the database)."""
        if self._stopping:
            return
        self._due.append(due)
        self._due_ready.set()

    async def _write_fires_forever(self) -> None:
        while True:
            await self._due_ready.wait()
            self._due_ready.clear()
            await self._drain_fires()

    async def _drain_fires(self) -> None:
        async with self._fire_lock:
            while self._due:
                batch: list[Due] = []
                size = 0
                while self._due and size < MAX_BATCH:
                    due = self._due.popleft()
                    batch.append(due)
                    size += len(due.run) + 1
                try:
                    await self._write_due_batch(batch)
                except Exception:
                    # A bug must not stop every later fire from being recorded; these are
                    # recorded from the database when the leader takes up its term again.
                    log.exception("could not record the fires of %d jobs", len(batch))
                    if self._relead is not None:
                        self._relead()

    async def _write_due_batch(self, batch: list[Due]) -> None:
        epoch = self._epoch
        if epoch is None or not self._acting():
            log.warning("not leading: %d fires left to the leader", sum(len(d.run) for d in batch))
            return
        now = self._clock()
        admissions: list[Admission] = []
        for due in batch:
            job = due.job
            if due.missed is not None:
                missed = self._missed_record(job, due.missed, now)
                admissions.append(Admission(execution=missed, epoch=epoch))
            for scheduled in due.run:
                execution = self._new_execution(job, ExecutionSource.SCHEDULE, scheduled, now)
                if not self._runnable(job):
                    admissions.append(Admission(execution=self._unrunnable(execution, now)))
                    continue
                # Catch-up runs the misfire policy chose queue up, one after another.
                late = due.noticed_time - scheduled > job.misfire_grace
                admissions.append(
                    Admission(
                        execution=execution,
                        due_time=scheduled + jitter_delay(job.id, scheduled, job.trigger.jitter),
                        policy=OverlapPolicy.BUFFER_ALL if late else job.overlap_policy,
                        epoch=epoch,
                    )
                )
        if await self._admit_with_retry(admissions, epoch=epoch) is None:
            # Not recorded, so the next run times stay where they were: whoever leads next
            # finds these fires missing and applies the jobs' misfire policies.
            return
        # Next run times are written after, with progress: a task need not wait for them,
        # and a fire re-fired from a stale one after a crash finds its execution exists.
        for due in batch:
            self._next_runs[due.job.id] = NextRun(
                job_id=due.job.id, version=due.job.version, next_run_time=due.next_run_time
            )
        self._progress_ready.set()

    def _missed_record(self, job: Job, missed: MissedFires, now: datetime) -> Execution:
        first, last = _stamp(missed.first_time), _stamp(missed.last_time)
        if missed.count == 1:
            what = f"1 fire at {first}"
        else:
            at_least = "at least " if missed.count_is_lower_bound else ""
            what = f"{at_least}{missed.count} fires from {first} to {last}"
        window = f", catch-up window {_seconds(job.catchup_window)}" if job.catchup_window else ""
        return replace(
            self._new_execution(job, ExecutionSource.SCHEDULE, missed.first_time, now),
            state=ExecutionState.MISSED,
            end_time=now,
            missed=missed,
            error_message=(
                f"{what} came later than the misfire grace of {_seconds(job.misfire_grace)} "
                f"and did not run (misfire policy {job.misfire_policy.value}{window})"
            ),
        )

    def _unrunnable(self, execution: Execution, now: datetime) -> Execution:
        return replace(
            execution,
            state=ExecutionState.FAILED,
            end_time=now,
            error_message=f"task {execution.task!r} is not registered on this server",
        )

    def _runnable(self, job: Job) -> bool:
        """Whether the job's task can run: registered here, or sent to Celery (whose
        workers have their own registry)."""
        return job.executor is ExecutorKind.CELERY or job.task in self._tasks

    def _new_execution(
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
            instance_id=self._instance_id,
            triggered_by=by,
            executor=job.executor,
        )

    async def _admit_with_retry(
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
        delays = _backoff()
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            if epoch is not None and (epoch != self._epoch or not self._acting()):
                log.warning("no longer leading: %d fires left to the leader", len(admissions))
                return None
            try:
                admitted = await self._store.admit_executions(
                    admissions,
                    epoch=epoch,
                    claim_for=self._instance_id,
                    claim_limit=0 if self._stopping else self._room_here(),
                )
                self._admitted(admitted)
                return admitted
            except NotLeader as error:
                log.warning("%s: %d fires left to the leader", error, len(admissions))
                return None
            except Exception as error:
                waited = loop.time() - started
                if isinstance(error, ChronoplaneError):
                    log.warning(
                        "recording %d executions failed, retrying: %s", len(admissions), error
                    )
                    if not (self._stopping and epoch is None and waited > STOP_RETRY_SECONDS):
                        await asyncio.sleep(next(delays))
                        continue
                else:
                    log.exception("recording %d executions failed", len(admissions))
                    if waited < WRITE_RETRY_SECONDS and not self._stopping:
                        await asyncio.sleep(next(delays))
                        continue
                    if epoch is not None and self._relead is not None:
                        log.error(
                            "gave up recording %d fires after %.0f s: taking up the term "
                            "again, which records them from the database",
                            len(admissions),
                            waited,
                        )
                        self._relead()
                        return None
                log.error(
                    "gave up recording %d executions after %.0f s: %s",
                    len(admissions),
                    waited,
                    error,
                )
                return None

    async def _admit(self, admissions: list[Admission]) -> Admitted:
        """Writes admissions made for a call (a trigger, a backfill), running here what this
        instance may of them."""
        admitted = await self._store.admit_executions(
            admissions, claim_for=self._instance_id, claim_limit=self._room_here()
        )
        self._admitted(admitted)
        return admitted

    def _admitted(self, admitted: Admitted) -> None:
        """After an admission: what was claimed for this instance starts, the claimer looks
        at the queue, and runs displaced by newer ones (CANCEL_RUNNING) are asked to stop."""
        if admitted.fenced:
            self._fenced()
        for execution, policy in admitted.claimed:
            started = execution.start_time or self._clock()
            self._launch(_Run(execution=execution, policy=policy, started=started))
        if any(e.state is ExecutionState.PENDING for e in admitted.inserted):
            self._wake.set()
        if admitted.displace:
            self._spawn(self._displace(admitted.displace))

    async def _displace(self, job_ids: list[str]) -> None:
        try:
            displaced = await self._store.displace_oldest(job_ids, now=self._clock())
        except ChronoplaneError as error:
            log.warning("could not stop runs displaced by newer ones: %s", error)
            return
        for execution in displaced:
            if execution.executor is ExecutorKind.CELERY:
                await self._revoke_task(execution)
                continue
            run = self._runs.get(execution.id)
            if run is not None:  # the others' instances are told by the database
                self._request_stop(run, ExecutionState.CANCELLED, DISPLACED)

    async def _revoke_task(self, execution: Execution) -> None:
        """Stops the Celery task of an execution the server ended (cancelled, displaced)."""
        if execution.executor is not ExecutorKind.CELERY or not execution.celery_task_id:
            return
        if self._revoke is None:
            log.warning(
                "execution %s is cancelled, but this server has no Celery broker to revoke "
                "its task: a worker that has it finds it cancelled before it starts",
                execution.id,
            )
            return
        await self._revoke(execution.celery_task_id)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        if not self._runnable(job):
            raise TaskNotRegistered(job.task)
        if request_id:
            existing = await self._store.get_execution_by_request_id(job.id, request_id)
            if existing is not None:
                return existing
        now = self._clock()
        execution = replace(
            self._new_execution(job, ExecutionSource.MANUAL, now, now, by=by),
            args=job.args if args is None else args,
            request_id=request_id,
        )
        # Asked for explicitly, ALLOW means "run it now, whatever is running".
        admitted = await self._admit(
            [
                Admission(
                    execution=execution,
                    due_time=now,
                    policy=policy or job.overlap_policy,
                    force=policy is OverlapPolicy.ALLOW,
                )
            ]
        )
        if not admitted.inserted:
            existing = await self._store.get_execution_by_request_id(job.id, request_id)
            if existing is None:
                raise JobNotFound(job.id)
            return existing
        return admitted.inserted[0]

    async def backfill(
        self, job: Job, fire_times: Sequence[datetime], *, policy: OverlapPolicy, by: str = ""
    ) -> tuple[list[Execution], int]:
        """Queues the given past fires as BACKFILL executions; returns those created and how
        many had been backfilled before."""
        if not self._runnable(job):
            raise TaskNotRegistered(job.task)
        now = self._clock()
        admitted = await self._admit(
            [
                Admission(
                    execution=self._new_execution(job, ExecutionSource.BACKFILL, t, now, by=by),
                    due_time=now,
                    policy=policy,
                )
                for t in fire_times
            ]
        )
        return admitted.inserted, len(fire_times) - len(admitted.inserted)

    # -- retries ------------------------------------------------------------------------------

    def retry_abandoned(self, execution: Execution, job: Job) -> bool:
        """Retries an execution a dead instance abandoned, if the job's retry policy says so
        (its error type is chronoplane.Abandoned)."""
        return self._retry(execution, job.retry, (execution.error_type or ABANDONED_ERROR_TYPE,))

    def _retry(self, execution: Execution, policy: RetryPolicy, errors: tuple[str, ...]) -> bool:
        if self._stopping or not policy.retries(execution.attempt, errors):
            return False
        retry = retry_of(execution, policy, now=self._clock(), instance_id=self._instance_id)
        # Queued as it is, due at the end of its backoff: it waits its turn for a slot.
        self._spawn(self._queue_retry(retry))
        return True

    async def _queue_retry(self, retry: Execution) -> None:
        await self._admit_with_retry([Admission(execution=retry)])
        self._wake.set()

    # -- claiming -----------------------------------------------------------------------------

    def notified(self, writer: str = "") -> None:
        """Executions were made ready (by instance ``writer``): look at the queue. This
        instance's own writes have woken it already."""
        if writer != self._instance_id:
            self._wake.set()

    async def _claim_forever(self) -> None:
        names = [definition.name for definition in self._tasks]
        delay = 0.1
        loop = asyncio.get_running_loop()
        last_poll = loop.time()
        while not self._stopping:
            timeout = CLAIM_POLL_SECONDS
            if self._next_due is not None:
                timeout = min(timeout, max(self._next_due - loop.time(), 0.001))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            if self._stopping:
                return
            try:
                if self._free() > 0:
                    await self._claim(names)
                else:
                    self._backlog = True
                if loop.time() - last_poll >= CLAIM_POLL_SECONDS:
                    last_poll = loop.time()
                    if await self._store.promote_waiting():
                        self._wake.set()
                    if self._runs:
                        await self._apply_cancel_requests()
            except Exception as error:
                log.warning("claiming executions failed: %s; again in %.1f s", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.1

    def _free(self) -> int:
        return self._max_running - len(self._runs) - self._lingering

    async def _claim(self, names: list[str]) -> None:
        free = self._free()
        claim = await self._store.claim_executions(
            instance_id=self._instance_id, limit=free, tasks=names
        )
        loop = asyncio.get_running_loop()
        self._next_due = (
            None if claim.next_due_in is None else loop.time() + claim.next_due_in.total_seconds()
        )
        if claim.fenced:
            self._fenced()
        for execution, policy in claim.executions:
            started = execution.start_time or self._clock()
            self._launch(_Run(execution=execution, policy=policy, started=started))
        # There may be more: look again once there is room (when a run here ends).
        self._backlog = len(claim.executions) >= free

    # -- cancellation -------------------------------------------------------------------------

    async def cancel(self, execution_id: str, *, reason: str, by: str = "") -> Execution:
        """Stops an execution, wherever it runs: PENDING ones never start, RUNNING ones are
        cancelled by the instance running them.

        Raises ``ExecutionNotFound``, ``ExecutionFinished`` when it had already ended, or
        ``CancellationPending`` when the instance running it did not stop it in time.
        """
        message = f"cancelled: {reason}" if reason else "cancelled"
        run = self._runs.get(execution_id)
        if run is not None and run.final is None and not run.stop.done():
            run.cancelled_by = by
            self._request_stop(run, ExecutionState.CANCELLED, message)
            await run.finalized.wait()
            await self._flush_progress()
            if run.final is ExecutionState.CANCELLED:
                return await self._store.get_execution(execution_id)
            current = await self._store.get_execution(execution_id)
            raise ExecutionFinished(execution_id, current.state.value)
        await self._flush_progress()
        request = await self._store.request_cancel(
            execution_id, message=message, now=self._clock(), by=by
        )
        if request.done:
            await self._revoke_task(request.execution)
            return request.execution
        owner = request.execution.instance_id
        deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_SECONDS
        while asyncio.get_running_loop().time() < deadline:
            if owner == self._instance_id:
                await self._apply_cancel_requests()
            await asyncio.sleep(0.05)
            current = await self._store.get_execution(execution_id)
            if current.state is ExecutionState.CANCELLED:
                return current
            if current.state is not ExecutionState.RUNNING:
                raise ExecutionFinished(execution_id, current.state.value)
        raise CancellationPending(execution_id, owner, CANCEL_WAIT_SECONDS)

    def notified_cancel(self, execution_id: str) -> None:
        """Someone asked (through any instance) to stop an execution that may run here."""
        if execution_id not in self._runs:
            return
        if self._cancels is not None and not self._cancels.done():
            self._cancels_again = True
            return
        self._cancels = asyncio.create_task(self._apply_cancels_forever(), name="runner-cancels")

    async def _apply_cancels_forever(self) -> None:
        while True:
            self._cancels_again = False
            try:
                await self._apply_cancel_requests()
            except Exception as error:
                log.warning("reading cancel requests failed: %s", error)
            if not self._cancels_again:
                return

    async def _apply_cancel_requests(self) -> None:
        requests = await self._store.cancel_requests(list(self._runs))
        for execution_id, message in requests.items():
            run = self._runs.get(execution_id)
            if run is not None:
                self._request_stop(run, ExecutionState.CANCELLED, message)

    def _request_stop(self, run: _Run, state: ExecutionState, message: str) -> None:
        """Asks a running execution to end in ``state``, when its coroutine sees it."""
        if not run.stop.done():
            run.stop.set_result((state, message))

    # -- running ------------------------------------------------------------------------------

    def _launch(self, run: _Run) -> None:
        self._runs[run.id] = run
        run.task = asyncio.create_task(self._run(run), name=f"execution-{run.id}")

    async def _run(self, run: _Run) -> None:
        work: Work | None = None
        try:
            work = run.work = self._start(run)
            if work is not None:
                await self._await_outcome(run, work)
        except Exception:
            log.exception("execution %s: the runner failed", run.id)
            self._finish_now(
                run, ExecutionState.FAILED, error_message="internal error in the runner"
            )
        finally:
            self._runs.pop(run.id, None)
            if work is not None and not work.done.done():
                # Still running in its thread: it keeps its room (and its job's slot) until
                # it returns.
                self._lingering += 1
                work.done.add_done_callback(lambda done: self._late(run, done))
            elif self._backlog:
                self._wake.set()

    def _start(self, run: _Run) -> Work | None:
        """Starts the task; None if it must not run."""
        execution = run.execution
        if run.stop.done():
            state, message = run.stop.result()
            self._finish_now(run, state, error_message=message)
            return None
        definition = self._tasks.get(execution.task)
        if definition is None:
            self._finish_now(
                run,
                ExecutionState.FAILED,
                error_message=f"task {execution.task!r} is not registered on this server",
            )
            return None

        def on_start(when: datetime) -> None:
            run.started = when  # a synchronous task may have waited for a thread

        context = ExecutionContext(
            execution_id=execution.id,
            job_id=execution.job_id,
            scheduled_time=execution.scheduled_time,
            attempt=execution.attempt,
            instance_id=self._instance_id,
        )
        token = execution_context.set(context)
        try:
            return self._executor.start(definition, execution.args, on_start)
        except Exception as error:  # calling it failed (wrong arguments, say)
            self._fail(run, error)
            return None
        finally:
            execution_context.reset(token)

    async def _await_outcome(self, run: _Run, work: Work) -> None:
        timeout = run.policy.timeout.total_seconds() if run.policy.timeout else None
        await asyncio.wait([work.done, run.stop], timeout=timeout, return_when="FIRST_COMPLETED")
        if work.done.done() and not run.stop.done():
            self._settle(run, work.done)
            return
        if run.stop.done():
            state, message = run.stop.result()
        else:
            state = ExecutionState.TIMED_OUT
            message = (
                f"ran longer than the timeout of {_seconds(run.policy.timeout or timedelta())}"
            )
        interruptible = work.cancel()
        if interruptible and not work.done.done():
            # An async task: give it the chance to clean up, then it is done either way.
            await asyncio.wait([work.done], timeout=CANCEL_GRACE_SECONDS)
        self._finish_now(run, state, error_message=message, keeps_slot=not work.done.done())
        if not interruptible:
            log.warning(
                "execution %s is %s, but its synchronous task cannot be interrupted: it keeps "
                "its worker thread and concurrency slot until it returns",
                run.id,
                state.value,
            )
        if state is ExecutionState.TIMED_OUT:
            self._retry(
                run.execution, run.policy.retry, ("builtins.TimeoutError", "builtins.OSError")
            )

    def _settle(self, run: _Run, done: asyncio.Future[Any]) -> None:
        """Records the outcome of a task that ended by itself."""
        if done.cancelled():
            self._finish_now(
                run, ExecutionState.INTERRUPTED, error_message="the task was cancelled"
            )
            return
        error = done.exception()
        if error is None:
            try:
                result = json_result(done.result())
            except ValueError as bad:
                self._fail(run, bad)
            else:
                self._finish_now(run, ExecutionState.SUCCEEDED, result=result)
            return
        self._fail(run, error)

    def _fail(self, run: _Run, error: BaseException) -> None:
        failure = Failure.of(error)
        self._finish_now(
            run,
            ExecutionState.FAILED,
            error_message=failure.message,
            error_traceback=failure.traceback,
            error_type=failure.type,
        )
        self._retry(run.execution, run.policy.retry, failure.types)

    def _late(self, run: _Run, done: asyncio.Future[Any]) -> None:
        """A task that outlived its execution's final state has ended: keep what it did as a
        note, and give its slot back."""
        self._lingering -= 1
        if done.cancelled():
            outcome = "was cancelled"
        elif (error := done.exception()) is not None:
            outcome = f"raised {type(error).__name__}: {error}"
        else:
            outcome = f"returned {json.dumps(done.result(), default=repr)[:MAX_NOTE_CHARS]}"
        when = self._clock().isoformat()
        final = run.final.value if run.final else "ended"
        note = f"after the execution was {final}, the task {outcome} at {when}"
        self._releases[run.id] = SlotRelease(id=run.id, job_id=run.execution.job_id, note=note)
        self._progress_ready.set()
        if self._backlog:
            self._wake.set()

    # -- progress -----------------------------------------------------------------------------

    def _finish_now(
        self,
        run: _Run,
        state: ExecutionState,
        *,
        result: Any = None,
        error_message: str = "",
        error_traceback: str = "",
        error_type: str = "",
        keeps_slot: bool = False,
    ) -> None:
        """Queues the final state; the first one queued for an execution wins."""
        if run.final is not None:
            return
        run.final = state
        self._finishes[run.id] = ExecutionFinish(
            id=run.id,
            job_id=run.execution.job_id,
            state=state,
            start_time=run.started,
            end_time=self._clock(),
            result=result,
            error_message=error_message,
            error_traceback=error_traceback,
            error_type=error_type,
            keeps_slot=keeps_slot,
            cancelled_by=run.cancelled_by if state is ExecutionState.CANCELLED else "",
        )
        run.finalized.set()
        self._progress_ready.set()

    async def _write_progress_forever(self) -> None:
        while True:
            await self._progress_ready.wait()
            self._progress_ready.clear()
            try:
                await self._flush_progress()
            except Exception:
                log.exception("could not record execution progress")

    async def _flush_progress(self) -> None:
        async with self._progress_lock:
            await self._flush_progress_locked()

    async def _flush_progress_locked(self) -> None:
        delays = _backoff()
        while self._finishes or self._releases or self._next_runs:
            finishes, self._finishes = self._finishes, {}
            releases, self._releases = self._releases, {}
            next_runs, self._next_runs = self._next_runs, {}
            if self._epoch is None:
                next_runs = {}  # the leader's to write
            try:
                progress = await self._store.record_progress(
                    list(finishes.values()),
                    list(releases.values()),
                    list(next_runs.values()),
                    epoch=self._epoch,
                )
            except Exception as error:
                # Kept and tried again, whatever went wrong: a lost final state would leave
                # an execution RUNNING for ever.
                log.warning(
                    "recording execution progress failed, retrying: %s: %s",
                    type(error).__name__,
                    error,
                )
                # Put them back under anything newer, then wait before trying again.
                self._finishes = finishes | self._finishes
                self._releases = releases | self._releases
                self._next_runs = next_runs | self._next_runs
                await asyncio.sleep(next(delays))
                continue
            if progress.readied:
                self._wake.set()  # slots were freed: queued executions may go
