"""The runner: turns fires into recorded executions, runs them, records how they ended.

The hot path is batched so that a burst of fires costs a few transactions, not thousands:

* fires queue up while the previous batch is being written, and the next batch takes them
  all (group commit, no timer): one INSERT of every execution in the batch, and one UPDATE of
  the jobs' next run times, in one transaction;
* a task starts only after its execution row is committed;
* starts and ends of executions are written the same way; an execution that ends before its
  start was written is written once, with both.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from chronoplane.server.engine.abc import Fire
from chronoplane.server.errors import ChronoplaneError, JobNotFound, TaskNotRegistered
from chronoplane.server.executors.abc import Executor
from chronoplane.server.ids import new_execution_id
from chronoplane.server.models import (
    Execution,
    ExecutionSource,
    ExecutionState,
    Job,
    JSONObject,
)
from chronoplane.server.storage.abc import ExecutionFinish, ExecutionStart, NextRun, Store
from chronoplane.server.tasks import TaskRegistry

__all__ = ["Runner"]

log = logging.getLogger(__name__)

MAX_BATCH = 2_000
MAX_RESULT_BYTES = 1 << 20
MAX_TRACEBACK_CHARS = 64 * 1024
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
        self._fires: list[Fire] = []
        self._fires_ready = asyncio.Event()
        # Held while a batch is written, so that stop() never cancels a write half-way.
        self._fire_lock = asyncio.Lock()
        self._progress_lock = asyncio.Lock()
        self._starts: dict[str, ExecutionStart] = {}
        self._finishes: dict[str, ExecutionFinish] = {}
        self._next_runs: dict[str, NextRun] = {}
        self._progress_ready = asyncio.Event()
        self._active: dict[str, int] = defaultdict(int)
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False

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
        INTERRUPTED, and writes everything still queued."""
        self._stopping = True
        await self._drain_fires()
        if self._runs:
            log.info("waiting up to %.0f s for %d running executions", grace, len(self._runs))
            await asyncio.wait(list(self._runs.values()), timeout=grace)
        for execution_id, run in list(self._runs.items()):
            self._finish_now(
                execution_id,
                ExecutionState.INTERRUPTED,
                error_message="the server shut down before the execution finished",
            )
            run.cancel()
        await asyncio.gather(*self._runs.values(), return_exceptions=True)
        await self._flush_progress()
        async with self._fire_lock, self._progress_lock:
            for loop in self._loops:
                loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self._flush_progress()

    @property
    def running(self) -> int:
        return len(self._runs)

    # -- fires --------------------------------------------------------------------------------

    def on_fires(self, fires: Sequence[Fire]) -> None:
        """The engine's handler: queue, wake the writer, return at once."""
        if self._stopping:
            return
        self._fires.extend(fires)
        self._fires_ready.set()

    async def _write_fires_forever(self) -> None:
        while True:
            await self._fires_ready.wait()
            self._fires_ready.clear()
            await self._drain_fires()

    async def _drain_fires(self) -> None:
        async with self._fire_lock:
            while self._fires:
                batch, self._fires = self._fires[:MAX_BATCH], self._fires[MAX_BATCH:]
                try:
                    await self._write_fire_batch(batch)
                except Exception:
                    # A bug must not stop every later fire from being recorded.
                    log.exception("could not record %d fires; they are lost", len(batch))

    async def _write_fire_batch(self, fires: list[Fire]) -> None:
        now = self._clock()
        executions = [self._execution_for(fire, now) for fire in fires]
        inserted = await self._insert_with_retry(executions)
        # Next run times are written after, with progress: a task need not wait for them,
        # and a fire re-fired from a stale one after a crash finds its execution exists.
        for fire in fires:
            self._next_runs[fire.job.id] = NextRun(
                job_id=fire.job.id, version=fire.job.version, next_run_time=fire.next_run_time
            )
        self._progress_ready.set()
        for execution, fire in zip(executions, fires, strict=True):
            if execution.state is not ExecutionState.PENDING:
                continue
            if execution.id in inserted:
                self._launch(execution, fire.job)
            else:
                self._active[execution.job_id] -= 1

    def _execution_for(self, fire: Fire, now: datetime) -> Execution:
        job = fire.job
        execution = Execution(
            id=new_execution_id(),
            job_id=job.id,
            state=ExecutionState.PENDING,
            source=ExecutionSource.SCHEDULE,
            scheduled_time=fire.scheduled_time,
            create_time=now,
            task=job.task,
            args=job.args,
            instance_id=self._instance_id,
        )
        if fire.missed:
            return replace(
                execution,
                state=ExecutionState.MISSED,
                end_time=now,
                error_message=(
                    f"fire noticed {fire.lateness.total_seconds():.3f} s late, beyond the "
                    f"misfire grace of {job.misfire_grace.total_seconds():g} s"
                ),
            )
        return self._admit(execution, job, now)

    def _admit(self, execution: Execution, job: Job, now: datetime) -> Execution:
        """PENDING with a concurrency slot reserved, or a final state saying why not."""
        if job.task not in self._tasks:
            return replace(
                execution,
                state=ExecutionState.FAILED,
                end_time=now,
                error_message=f"task {job.task!r} is not registered on this server",
            )
        if self._active[job.id] >= job.max_concurrent:
            return replace(
                execution,
                state=ExecutionState.SKIPPED,
                end_time=now,
                error_message=f"max_concurrent ({job.max_concurrent}) executions were running",
            )
        self._active[job.id] += 1
        return execution

    async def _insert_with_retry(self, executions: list[Execution]) -> set[str]:
        delay = 0.1
        deadline = asyncio.get_running_loop().time() + WRITE_RETRY_SECONDS
        while True:
            try:
                return await self._store.insert_executions(executions)
            except ChronoplaneError as error:
                if asyncio.get_running_loop().time() > deadline:
                    log.error(
                        "gave up recording %d fires after %.0f s: %s",
                        len(executions),
                        WRITE_RETRY_SECONDS,
                        error,
                    )
                    return set()
                log.warning("recording %d fires failed, retrying: %s", len(executions), error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- manual runs --------------------------------------------------------------------------

    async def trigger(self, job: Job, *, args: JSONObject | None, request_id: str) -> Execution:
        """Records and starts a manual execution of ``job`` now."""
        if job.task not in self._tasks:
            raise TaskNotRegistered(job.task)
        if request_id:
            existing = await self._store.get_execution_by_request_id(job.id, request_id)
            if existing is not None:
                return existing
        now = self._clock()
        execution = Execution(
            id=new_execution_id(),
            job_id=job.id,
            state=ExecutionState.PENDING,
            source=ExecutionSource.MANUAL,
            scheduled_time=now,
            create_time=now,
            task=job.task,
            args=job.args if args is None else args,
            instance_id=self._instance_id,
            request_id=request_id,
        )
        execution = self._admit(execution, job, now)
        try:
            inserted = await self._store.insert_executions([execution])
        except BaseException:
            self._release(execution)
            raise
        if execution.id not in inserted:
            self._release(execution)
            existing = await self._store.get_execution_by_request_id(job.id, request_id)
            if existing is None:
                raise JobNotFound(job.id)
            return existing
        if execution.state is ExecutionState.PENDING:
            self._launch(execution, job)
        return execution

    def _release(self, execution: Execution) -> None:
        if execution.state is ExecutionState.PENDING:
            self._active[execution.job_id] -= 1

    # -- running ------------------------------------------------------------------------------

    def _launch(self, execution: Execution, job: Job) -> None:
        run = asyncio.create_task(self._run(execution, job), name=f"execution-{execution.id}")
        self._runs[execution.id] = run

    async def _run(self, execution: Execution, job: Job) -> None:
        definition = self._tasks.get(job.task)
        assert definition is not None, "admitted executions have a registered task"
        started: datetime | None = None

        def on_start(when: datetime) -> None:
            nonlocal started
            started = when
            if execution.id not in self._finishes:
                self._starts[execution.id] = ExecutionStart(id=execution.id, start_time=when)
                self._progress_ready.set()

        try:
            result = _json_result(await self._executor.run(definition, execution.args, on_start))
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._finish_now(
                execution.id,
                ExecutionState.FAILED,
                start_time=started,
                error_message=f"{type(error).__name__}: {error}",
                error_traceback=traceback.format_exc()[-MAX_TRACEBACK_CHARS:],
            )
        else:
            self._finish_now(
                execution.id, ExecutionState.SUCCEEDED, start_time=started, result=result
            )
        finally:
            self._runs.pop(execution.id, None)
            self._active[execution.job_id] -= 1
            if self._active[execution.job_id] <= 0:
                del self._active[execution.job_id]

    def _finish_now(
        self,
        execution_id: str,
        state: ExecutionState,
        *,
        start_time: datetime | None = None,
        result: Any = None,
        error_message: str = "",
        error_traceback: str = "",
    ) -> None:
        """Queues the final state; the first one queued for an execution wins."""
        if execution_id in self._finishes:
            return
        start = self._starts.pop(execution_id, None)
        if start_time is None and start is not None:
            start_time = start.start_time
        self._finishes[execution_id] = ExecutionFinish(
            id=execution_id,
            state=state,
            start_time=start_time,
            end_time=self._clock(),
            result=result,
            error_message=error_message,
            error_traceback=error_traceback,
        )
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
        while self._starts or self._finishes or self._next_runs:
            starts, self._starts = self._starts, {}
            finishes, self._finishes = self._finishes, {}
            next_runs, self._next_runs = self._next_runs, {}
            try:
                await self._store.record_progress(
                    list(starts.values()), list(finishes.values()), list(next_runs.values())
                )
            except ChronoplaneError as error:
                log.warning("recording execution progress failed, retrying: %s", error)
                # Put them back under anything newer, then wait before trying again.
                self._starts = starts | self._starts
                self._finishes = finishes | self._finishes
                self._next_runs = next_runs | self._next_runs
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
