"""The runner: turns fires into recorded executions, runs them, records how they ended.

The hot path is batched so that a burst of fires costs a few transactions, not thousands:

* fires queue up while the previous batch is being written, and the next batch takes them
  all (group commit, no timer): one INSERT of every execution in the batch, in one
  transaction; next run times follow with the progress writes;
* a task starts only after its execution row is committed;
* starts and ends of executions are written the same way; an execution that ends before its
  start was written is written once, with both.

Concurrency is counted in *slots* per job: an execution holds one from its admission until
its code has really ended. A synchronous task that timed out or was cancelled keeps its slot
until its thread returns; its final state is recorded at once, its late outcome as a note.

Executions that wait (a buffered fire, a retry in its backoff, a backfill fire) are *claimed*
before they start: PENDING -> RUNNING is written first, so that a cancelled one never starts
and a restart can run waiting retries and backfill fires without running one twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import traceback
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from chronoplane.server.engine.abc import Fire
from chronoplane.server.errors import (
    ChronoplaneError,
    ExecutionFinished,
    FailedPrecondition,
    JobNotFound,
    NotLeader,
    TaskNotRegistered,
)
from chronoplane.server.executors.abc import Executor, Work
from chronoplane.server.ids import new_execution_id
from chronoplane.server.models import (
    ABANDONED_ERROR_TYPE,
    Execution,
    ExecutionSource,
    ExecutionState,
    Job,
    JSONObject,
    MissedFires,
    OverlapPolicy,
)
from chronoplane.server.scheduling import jitter_delay, plan_fires
from chronoplane.server.storage.abc import ExecutionFinish, ExecutionStart, NextRun, Store
from chronoplane.server.tasks import ExecutionContext, TaskRegistry, execution_context

__all__ = ["Due", "Runner"]

log = logging.getLogger(__name__)

MAX_BATCH = 2_000
MAX_RESULT_BYTES = 1 << 20
MAX_TRACEBACK_CHARS = 64 * 1024
MAX_NOTE_CHARS = 4 * 1024
# A batch that cannot be written is retried this long before its fires are given up (loudly).
WRITE_RETRY_SECONDS = 60.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _json_result(value: Any) -> Any:
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


def _type_names(error: BaseException) -> tuple[str, ...]:
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


@dataclass(frozen=True, kw_only=True)
class Due:
    """What a job's fires came to: the plan's runs and missed summary, and the fire after."""

    job: Job
    run: list[datetime]
    missed: MissedFires | None
    next_run_time: datetime | None
    noticed_time: datetime


Decision = Literal["launch", "queue", "cancel_and_queue", "none"]


@dataclass(eq=False)
class _Run:
    """An execution this instance holds: waiting for a slot or its time, or running."""

    execution: Execution
    job: Job
    claim: bool
    """Write PENDING -> RUNNING before starting (see the module docstring)."""
    stop: asyncio.Future[tuple[ExecutionState, str]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None
    work: Work | None = None
    started: datetime | None = None
    final: ExecutionState | None = None
    finalized: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.execution.id


class Runner:
    def __init__(
        self,
        *,
        store: Store,
        executor: Executor,
        tasks: TaskRegistry,
        instance_id: str,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._store = store
        self._executor = executor
        self._tasks = tasks
        self._instance_id = instance_id
        self._clock = clock
        self._due: deque[Due] = deque()
        self._due_ready = asyncio.Event()
        # Held while a batch is written, so that stop() never cancels a write half-way.
        self._fire_lock = asyncio.Lock()
        self._progress_lock = asyncio.Lock()
        self._starts: dict[str, ExecutionStart] = {}
        self._finishes: dict[str, ExecutionFinish] = {}
        self._next_runs: dict[str, NextRun] = {}
        self._notes: dict[str, str] = {}
        self._progress_ready = asyncio.Event()
        # Per job: slots held, executions waiting for one (reserved at admission, before
        # their rows are written), and those running, oldest first.
        self._slots: dict[str, int] = defaultdict(int)
        self._queued: dict[str, int] = defaultdict(int)
        self._waiting: dict[str, deque[_Run]] = defaultdict(deque)
        self._running: dict[str, dict[str, _Run]] = defaultdict(dict)
        self._runs: dict[str, _Run] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        # Scheduled fires and next run times are written only while leading, with the epoch.
        self._epoch: int | None = None
        self._acting: Callable[[], bool] = lambda: False

    # -- leadership ---------------------------------------------------------------------------

    def lead(self, epoch: int, acting: Callable[[], bool]) -> None:
        """From now on, write scheduled fires and next run times with ``epoch``, while
        ``acting()`` says the leadership holds."""
        self._epoch = epoch
        self._acting = acting

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
        self._loops = [
            asyncio.create_task(self._write_fires_forever(), name="runner-fires"),
            asyncio.create_task(self._write_progress_forever(), name="runner-progress"),
        ]
        for loop in self._loops:
            loop.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("runner loop %s died", task.get_name(), exc_info=task.exception())

    async def stop(self, grace: float) -> None:
        """Waits up to ``grace`` seconds for running executions, records the rest as
        INTERRUPTED, and writes everything still queued. Waiting retries and backfill fires
        stay PENDING for the next start."""
        self._stopping = True
        await self._drain_fires()
        for run in list(self._runs.values()):
            if run.task is None:
                self._drop_waiting(run)
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
            for loop in self._loops:
                loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self._flush_progress()

    def _drop_waiting(self, run: _Run) -> None:
        """At shutdown: a waiting retry or backfill fire stays PENDING for the next start; a
        buffered fire is recorded INTERRUPTED."""
        if run.timer is not None:
            run.timer.cancel()
        waiting = self._waiting[run.execution.job_id]
        if run in waiting:
            waiting.remove(run)
            self._queued[run.execution.job_id] -= 1
        self._runs.pop(run.id, None)
        if run.execution.source not in (ExecutionSource.RETRY, ExecutionSource.BACKFILL):
            self._finish_now(
                run,
                ExecutionState.INTERRUPTED,
                error_message="the server shut down while the execution waited to start",
            )

    @property
    def running(self) -> int:
        return sum(1 for run in self._runs.values() if run.task is not None)

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
                    # A bug must not stop every later fire from being recorded.
                    log.exception("could not record the fires of %d jobs; lost", len(batch))

    async def _write_due_batch(self, batch: list[Due]) -> None:
        epoch = self._epoch
        if epoch is None or not self._acting():
            log.warning("not leading: %d fires left to the leader", sum(len(d.run) for d in batch))
            return
        now = self._clock()
        admitted: list[tuple[Execution, Job, Decision]] = []
        for due in batch:
            job = due.job
            if due.missed is not None:
                admitted.append((self._missed_record(job, due.missed, now), job, "none"))
            for scheduled in due.run:
                execution = self._new_execution(job, ExecutionSource.SCHEDULE, scheduled, now)
                # Catch-up runs the misfire policy chose queue up, one after another.
                late = due.noticed_time - scheduled > job.misfire_grace
                policy = OverlapPolicy.BUFFER_ALL if late else job.overlap_policy
                admitted.append(self._admit(execution, job, policy, now))
        inserted = await self._insert_with_retry([e for e, _, _ in admitted], epoch=epoch)
        # Next run times are written after, with progress: a task need not wait for them,
        # and a fire re-fired from a stale one after a crash finds its execution exists.
        for due in batch:
            self._next_runs[due.job.id] = NextRun(
                job_id=due.job.id, version=due.job.version, next_run_time=due.next_run_time
            )
        self._progress_ready.set()
        for execution, job, decision in admitted:
            self._carry_out(execution, job, decision, written=execution.id in inserted)

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

    def _new_execution(
        self, job: Job, source: ExecutionSource, scheduled: datetime, now: datetime
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
            instance_id=self._instance_id,
        )

    # -- admission ----------------------------------------------------------------------------

    def _admit(
        self,
        execution: Execution,
        job: Job,
        policy: OverlapPolicy,
        now: datetime,
        *,
        force: bool = False,
    ) -> tuple[Execution, Job, Decision]:
        """PENDING with a slot (or a place in the queue) reserved, or a final state saying
        why not; ``force`` starts it beyond max_concurrent. The decision is carried out once
        the row is written."""
        if job.task not in self._tasks:
            failed = replace(
                execution,
                state=ExecutionState.FAILED,
                end_time=now,
                error_message=f"task {job.task!r} is not registered on this server",
            )
            return failed, job, "none"
        limit = job.max_concurrent or math.inf
        if force or self._slots[job.id] + self._queued[job.id] < limit:
            self._slots[job.id] += 1
            return execution, job, "launch"
        if policy is OverlapPolicy.BUFFER_ALL or (
            policy is OverlapPolicy.BUFFER_ONE and self._queued[job.id] == 0
        ):
            self._queued[job.id] += 1
            return execution, job, "queue"
        if policy is OverlapPolicy.CANCEL_RUNNING:
            self._queued[job.id] += 1
            return execution, job, "cancel_and_queue"
        reason = (
            "a run was already waiting (overlap policy buffer_one)"
            if policy is OverlapPolicy.BUFFER_ONE
            else f"max_concurrent ({job.max_concurrent}) executions were running"
        )
        skipped = replace(
            execution, state=ExecutionState.SKIPPED, end_time=now, error_message=reason
        )
        return skipped, job, "none"

    def _carry_out(self, execution: Execution, job: Job, decision: Decision, written: bool) -> None:
        if decision == "none":
            return
        if decision == "launch":
            if not written:
                self._slots[job.id] -= 1
                return
            claim = execution.source in (ExecutionSource.RETRY, ExecutionSource.BACKFILL)
            self._launch(_Run(execution=execution, job=job, claim=claim))
            return
        if not written:
            self._queued[job.id] -= 1
            return
        run = _Run(execution=execution, job=job, claim=True)
        self._runs[run.id] = run
        if decision == "cancel_and_queue":
            self._waiting[job.id].appendleft(run)
            self._cancel_oldest(job.id)
        else:
            self._waiting[job.id].append(run)
        self._dispatch(job.id)

    def _cancel_oldest(self, job_id: str) -> None:
        for run in self._running[job_id].values():
            if not run.stop.done():
                self._request_stop(
                    run,
                    ExecutionState.CANCELLED,
                    "cancelled for a newer run (overlap policy cancel_running)",
                )
                return

    def _dispatch(self, job_id: str) -> None:
        """Starts waiting executions while the job has free slots."""
        waiting = self._waiting[job_id]
        while waiting:
            run = waiting[0]
            limit = run.job.max_concurrent or math.inf
            if self._slots[job_id] >= limit:
                return
            waiting.popleft()
            self._queued[job_id] -= 1
            self._slots[job_id] += 1
            self._launch(run)

    def _enqueue(self, run: _Run) -> None:
        """A waiting retry or backfill fire whose time has come."""
        run.timer = None
        if self._stopping or run.stop.done():
            return
        self._queued[run.execution.job_id] += 1
        self._waiting[run.execution.job_id].append(run)
        self._dispatch(run.execution.job_id)

    async def _insert_with_retry(
        self, executions: list[Execution], *, epoch: int | None = None
    ) -> set[str]:
        delay = 0.1
        deadline = asyncio.get_running_loop().time() + WRITE_RETRY_SECONDS
        while True:
            if epoch is not None and (epoch != self._epoch or not self._acting()):
                log.warning("no longer leading: %d fires left to the leader", len(executions))
                return set()
            try:
                return await self._store.insert_executions(executions, epoch=epoch)
            except NotLeader as error:
                log.warning("%s: %d fires left to the leader", error, len(executions))
                return set()
            except ChronoplaneError as error:
                if asyncio.get_running_loop().time() > deadline:
                    log.error(
                        "gave up recording %d executions after %.0f s: %s",
                        len(executions),
                        WRITE_RETRY_SECONDS,
                        error,
                    )
                    return set()
                log.warning("recording %d executions failed, retrying: %s", len(executions), error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- manual runs, backfills, resumption -----------------------------------------------------

    async def trigger(
        self,
        job: Job,
        *,
        args: JSONObject | None,
        request_id: str,
        policy: OverlapPolicy | None = None,
    ) -> Execution:
        """Records and starts (or queues, or skips) a manual execution of ``job`` now."""
        if job.task not in self._tasks:
            raise TaskNotRegistered(job.task)
        if request_id:
            existing = await self._store.get_execution_by_request_id(job.id, request_id)
            if existing is not None:
                return existing
        now = self._clock()
        execution = replace(
            self._new_execution(job, ExecutionSource.MANUAL, now, now),
            args=job.args if args is None else args,
            request_id=request_id,
        )
        # Asked for explicitly, ALLOW means "run it now, whatever is running".
        execution, job, decision = self._admit(
            execution, job, policy or job.overlap_policy, now, force=policy is OverlapPolicy.ALLOW
        )
        try:
            inserted = await self._store.insert_executions([execution])
        except BaseException:
            self._carry_out(execution, job, decision, written=False)
            raise
        written = execution.id in inserted
        self._carry_out(execution, job, decision, written=written)
        if not written:
            existing = await self._store.get_execution_by_request_id(job.id, request_id)
            if existing is None:
                raise JobNotFound(job.id)
            return existing
        return execution

    async def backfill(
        self, job: Job, fire_times: Sequence[datetime], *, policy: OverlapPolicy
    ) -> tuple[list[Execution], int]:
        """Records and runs the given past fires as BACKFILL executions; returns those
        created and how many had been backfilled before."""
        if job.task not in self._tasks:
            raise TaskNotRegistered(job.task)
        now = self._clock()
        admitted = [
            self._admit(
                self._new_execution(job, ExecutionSource.BACKFILL, t, now), job, policy, now
            )
            for t in fire_times
        ]
        try:
            inserted = await self._store.insert_executions([e for e, _, _ in admitted])
        except BaseException:
            for execution, job_, decision in admitted:
                self._carry_out(execution, job_, decision, written=False)
            raise
        for execution, job_, decision in admitted:
            self._carry_out(execution, job_, decision, written=execution.id in inserted)
        created = [e for e, _, _ in admitted if e.id in inserted]
        return created, len(admitted) - len(created)

    def resume(self, executions: Iterable[tuple[Execution, Job]]) -> None:
        """Takes back waiting retries and backfill fires after a restart (see
        ``Store.list_resumable``): each starts at its time, when a slot is free."""
        for execution, job in executions:
            run = _Run(execution=execution, job=job, claim=True)
            self._runs[run.id] = run
            self._wait_until(run, execution.scheduled_time)

    def _wait_until(self, run: _Run, when: datetime) -> None:
        delay = (when - self._clock()).total_seconds()
        if delay <= 0:
            self._enqueue(run)
        else:
            run.timer = asyncio.get_running_loop().call_later(delay, self._enqueue, run)

    # -- cancellation -------------------------------------------------------------------------

    async def cancel(self, execution_id: str, *, reason: str) -> Execution:
        """Stops an execution: PENDING ones never start, RUNNING ones are cancelled.

        Raises ``ExecutionNotFound``, or ``ExecutionFinished`` when it had already ended.
        """
        message = f"cancelled: {reason}" if reason else "cancelled"
        run = self._runs.get(execution_id)
        if run is not None and run.final is None and not run.stop.done():
            self._request_stop(run, ExecutionState.CANCELLED, message)
            await run.finalized.wait()
            await self._flush_progress()
            if run.final is ExecutionState.CANCELLED:
                return await self._store.get_execution(execution_id)
        else:
            # Not held here: a row no process runs, or one another instance runs.
            await self._flush_progress()
            current = await self._store.get_execution(execution_id)
            if current.state is ExecutionState.RUNNING and current.instance_id != self._instance_id:
                raise FailedPrecondition(
                    f"execution {execution_id!r} runs on instance {current.instance_id}: "
                    "cancel it through that instance (see ListInstances)"
                )
            if current.state in (ExecutionState.PENDING, ExecutionState.RUNNING):
                finish = ExecutionFinish(
                    id=execution_id,
                    state=ExecutionState.CANCELLED,
                    start_time=current.start_time,
                    end_time=self._clock(),
                    error_message=message,
                )
                if await self._store.finish_execution(finish):
                    return await self._store.get_execution(execution_id)
        current = await self._store.get_execution(execution_id)
        raise ExecutionFinished(execution_id, current.state.value)

    def _request_stop(self, run: _Run, state: ExecutionState, message: str) -> None:
        """Asks a held execution to end in ``state``: a waiting one ends at once, a running
        one when its coroutine sees the request."""
        if run.stop.done():
            return
        run.stop.set_result((state, message))
        if run.task is None:
            # Waiting for its time or for a slot: it never started.
            if run.timer is not None:
                run.timer.cancel()
                run.timer = None
            waiting = self._waiting[run.execution.job_id]
            if run in waiting:
                waiting.remove(run)
                self._queued[run.execution.job_id] -= 1
            self._runs.pop(run.id, None)
            self._finish_now(run, state, error_message=message)

    # -- running ------------------------------------------------------------------------------

    def _launch(self, run: _Run) -> None:
        """Starts a run that holds a slot."""
        self._runs[run.id] = run
        run.task = asyncio.create_task(self._run(run), name=f"execution-{run.id}")

    async def _run(self, run: _Run) -> None:
        job_id = run.execution.job_id
        self._running[job_id][run.id] = run
        work: Work | None = None
        try:
            work = await self._start(run)
            if work is None:
                return
            await self._await_outcome(run, work)
        except Exception:
            log.exception("execution %s: the runner failed", run.id)
            self._finish_now(
                run, ExecutionState.FAILED, error_message="internal error in the runner"
            )
        finally:
            self._running[job_id].pop(run.id, None)
            if not self._running[job_id]:
                del self._running[job_id]
            self._runs.pop(run.id, None)
            if work is None or work.done.done():
                self._release(job_id)
            else:
                # Still running in its thread: it keeps the slot until it returns.
                work.done.add_done_callback(lambda done: self._late(run, done))

    async def _start(self, run: _Run) -> Work | None:
        """Waits out the jitter, claims if needed, starts the task; None if it must not run."""
        execution, job = run.execution, run.job
        if execution.source is ExecutionSource.SCHEDULE:
            due = execution.scheduled_time + jitter_delay(
                job.id, execution.scheduled_time, job.trigger.jitter
            )
            delay = (due - self._clock()).total_seconds()
            if delay > 0:
                await asyncio.wait([run.stop], timeout=delay)
        if run.stop.done():
            state, message = run.stop.result()
            self._finish_now(run, state, error_message=message)
            return None
        if run.claim:
            run.started = self._clock()
            if not await self._store.claim_execution(run.id, start_time=run.started):
                run.final = ExecutionState.CANCELLED
                run.finalized.set()
                return None
            if run.stop.done():  # cancelled while the claim was written
                state, message = run.stop.result()
                self._finish_now(run, state, error_message=message)
                return None
        definition = self._tasks.get(job.task)
        if definition is None:
            self._finish_now(
                run,
                ExecutionState.FAILED,
                error_message=f"task {job.task!r} is not registered on this server",
            )
            return None

        def on_start(when: datetime) -> None:
            if run.claim:
                return
            run.started = when
            if run.final is None:
                self._starts[run.id] = ExecutionStart(id=run.id, start_time=when)
                self._progress_ready.set()

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
        timeout = run.job.timeout.total_seconds() if run.job.timeout else None
        await asyncio.wait([work.done, run.stop], timeout=timeout, return_when="FIRST_COMPLETED")
        if work.done.done() and not run.stop.done():
            self._settle(run, work.done)
            return
        if run.stop.done():
            state, message = run.stop.result()
        else:
            state = ExecutionState.TIMED_OUT
            message = f"ran longer than the timeout of {_seconds(run.job.timeout or timedelta())}"
        self._finish_now(run, state, error_message=message)
        if not work.cancel():
            log.warning(
                "execution %s is %s, but its synchronous task cannot be interrupted: it keeps "
                "its worker thread and concurrency slot until it returns",
                run.id,
                state.value,
            )
        elif not work.done.done():
            # An async task: give it the chance to clean up, then it is done either way.
            await asyncio.wait([work.done], timeout=5.0)
        if state is ExecutionState.TIMED_OUT:
            self._maybe_retry(run, ("builtins.TimeoutError", "builtins.OSError"))

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
                result = _json_result(done.result())
            except ValueError as bad:
                self._fail(run, bad)
            else:
                self._finish_now(run, ExecutionState.SUCCEEDED, result=result)
            return
        self._fail(run, error)

    def _fail(self, run: _Run, error: BaseException) -> None:
        names = _type_names(error)
        self._finish_now(
            run,
            ExecutionState.FAILED,
            error_message=f"{type(error).__name__}: {error}",
            error_traceback="".join(traceback.format_exception(error))[-MAX_TRACEBACK_CHARS:],
            error_type=names[0] if names else "",
        )
        self._maybe_retry(run, names)

    def _late(self, run: _Run, done: asyncio.Future[Any]) -> None:
        """A task that outlived its execution's final state has ended: keep what it did as a
        note, and give its slot back."""
        if done.cancelled():
            outcome = "was cancelled"
        elif (error := done.exception()) is not None:
            outcome = f"raised {type(error).__name__}: {error}"
        else:
            outcome = f"returned {json.dumps(done.result(), default=repr)[:MAX_NOTE_CHARS]}"
        when = self._clock().isoformat()
        final = run.final.value if run.final else "ended"
        self._notes[run.id] = f"after the execution was {final}, the task {outcome} at {when}"
        self._progress_ready.set()
        self._release(run.execution.job_id)

    def _release(self, job_id: str) -> None:
        self._slots[job_id] -= 1
        if self._slots[job_id] <= 0:
            del self._slots[job_id]
        self._dispatch(job_id)
        if not self._waiting[job_id] and not self._queued[job_id]:
            del self._waiting[job_id], self._queued[job_id]

    # -- retries ------------------------------------------------------------------------------

    def _maybe_retry(self, run: _Run, error_types: tuple[str, ...]) -> None:
        self._retry(run.execution, run.job, error_types)

    def retry_abandoned(self, execution: Execution, job: Job) -> bool:
        """Retries an execution a dead instance abandoned, if the job's retry policy says so
        (its error type is chronoplane.Abandoned)."""
        return self._retry(execution, job, (execution.error_type or ABANDONED_ERROR_TYPE,))

    def _retry(self, execution: Execution, job: Job, error_types: tuple[str, ...]) -> bool:
        if self._stopping or not job.retry.retries(execution.attempt, error_types):
            return False
        now = self._clock()
        retry = replace(
            self._new_execution(
                job,
                ExecutionSource.RETRY,
                now + job.retry.backoff(execution.attempt),
                now,
            ),
            task=execution.task,
            args=execution.args,
            attempt=execution.attempt + 1,
            first_execution_id=execution.first_execution_id or execution.id,
        )
        task = asyncio.create_task(self._schedule_retry(retry, job))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return True

    async def _schedule_retry(self, retry: Execution, job: Job) -> None:
        inserted = await self._insert_with_retry([retry])
        if retry.id not in inserted or self._stopping:
            return
        run = _Run(execution=retry, job=job, claim=True)
        self._runs[run.id] = run
        self._wait_until(run, retry.scheduled_time)

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
    ) -> None:
        """Queues the final state; the first one queued for an execution wins."""
        if run.final is not None:
            return
        run.final = state
        self._starts.pop(run.id, None)
        self._finishes[run.id] = ExecutionFinish(
            id=run.id,
            state=state,
            start_time=run.started,
            end_time=self._clock(),
            result=result,
            error_message=error_message,
            error_traceback=error_traceback,
            error_type=error_type,
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
        delay = 0.1
        while self._starts or self._finishes or self._next_runs or self._notes:
            starts, self._starts = self._starts, {}
            finishes, self._finishes = self._finishes, {}
            next_runs, self._next_runs = self._next_runs, {}
            notes, self._notes = self._notes, {}
            if self._epoch is None:
                next_runs = {}  # the leader's to write
            try:
                await self._store.record_progress(
                    list(starts.values()),
                    list(finishes.values()),
                    list(next_runs.values()),
                    epoch=self._epoch,
                )
                for execution_id, note in notes.items():
                    await self._store.add_note(execution_id, note)
            except Exception as error:
                # Kept and tried again, whatever went wrong: a lost final state would leave
                # an execution RUNNING for ever.
                log.warning(
                    "recording execution progress failed, retrying: %s: %s",
                    type(error).__name__,
                    error,
                )
                # Put them back under anything newer, then wait before trying again.
                self._starts = starts | self._starts
                self._finishes = finishes | self._finishes
                self._next_runs = next_runs | self._next_runs
                self._notes = notes | self._notes
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
