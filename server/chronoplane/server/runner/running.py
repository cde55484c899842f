"""Running: an execution claimed here runs on the executor, within its timeout, until it
ends by itself, times out, or is asked to stop (cancelled, displaced, the server stopping,
the instance taken for dead). A claimed execution holds a slot of its job until its code has
really ended: a synchronous task that timed out or was cancelled keeps its slot until its
thread returns; its final state is recorded at once, its late outcome as a note."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from chronoplane.server import metrics
from chronoplane.server.executors.abc import Executor, Work
from chronoplane.server.models import Execution, ExecutionSource, ExecutionState, RetryPolicy
from chronoplane.server.runner.outcomes import (
    MAX_NOTE_CHARS,
    Failure,
    Outcomes,
    json_result,
)
from chronoplane.server.runner.state import Run, Shared
from chronoplane.server.tasks import ExecutionContext, TaskRegistry, execution_context
from chronoplane.server.tracing import execution_span

__all__ = ["CANCEL_GRACE_SECONDS", "Running"]

log = logging.getLogger("chronoplane.server.runner")

# An async task that ignores its cancellation gets this long before it is left running.
CANCEL_GRACE_SECONDS = 5.0

Retry = Callable[[Execution, RetryPolicy, tuple[str, ...]], bool]


def _seconds(value: timedelta) -> str:
    return f"{value.total_seconds():g} s"


class Running:
    def __init__(
        self,
        shared: Shared,
        *,
        executor: Executor,
        tasks: TaskRegistry,
        outcomes: Outcomes,
        retry: Retry,
    ) -> None:
        self._shared = shared
        self._executor = executor
        self._tasks = tasks
        self._outcomes = outcomes
        # Queues the next attempt of a failed run, if its policy says so (retries.py).
        self._retry = retry

    def launch(self, run: Run) -> None:
        execution = run.execution
        if execution.source is not ExecutionSource.BACKFILL:  # late on purpose
            late = (run.started - execution.scheduled_time).total_seconds()
            metrics.scheduling.late(execution.task, max(0.0, late))
        self._shared.runs[run.id] = run
        run.task = asyncio.create_task(self._run(run), name=f"execution-{run.id}")

    def disown(self, message: str) -> int:
        """Stops every execution running here, at once: this instance may have been taken
        for dead and its executions given to others. An async task is cancelled before it
        can take another step (called from a plain callback, this takes effect before any
        task resumes); a synchronous one cannot be, and runs on in its thread, its outcome
        kept as a note. Their final state is INTERRUPTED with ``message``, unless they were
        ABANDONED already. Returns how many."""
        runs = self._shared.runs
        for run in runs.values():
            if run.work is not None:
                run.work.cancel()
            run.request_stop(ExecutionState.INTERRUPTED, message)
        return len(runs)

    async def _run(self, run: Run) -> None:
        shared = self._shared
        execution = run.execution
        # In this run's own context: the task sees it (current_execution), and every line
        # logged about the run, the task's own included, names its job and execution.
        execution_context.set(
            ExecutionContext(
                execution_id=execution.id,
                job_id=execution.job_id,
                scheduled_time=execution.scheduled_time,
                attempt=execution.attempt,
                instance_id=shared.instance_id,
            )
        )
        work: Work | None = None
        try:
            with execution_span(run.execution, executor="inline") as outcome:
                work = run.work = self._start(run)
                if work is not None:
                    await self._await_outcome(run, work)
                if run.final is not None:
                    outcome(run.final)
        except Exception:
            log.exception("execution %s: the runner failed", run.id)
            self._outcomes.finish(
                run, ExecutionState.FAILED, error_message="internal error in the runner"
            )
        finally:
            shared.runs.pop(run.id, None)
            if work is not None and not work.done.done():
                # Still running in its thread: it keeps its room (and its job's slot) until
                # it returns.
                shared.lingering += 1
                work.done.add_done_callback(lambda done: self._late(run, done))
            elif shared.backlog:
                shared.wake.set()

    def _start(self, run: Run) -> Work | None:
        """Starts the task; None if it must not run."""
        execution = run.execution
        if run.stop.done():
            state, message = run.stop.result()
            self._outcomes.finish(run, state, error_message=message)
            return None
        definition = self._tasks.get(execution.task)
        if definition is None:
            self._outcomes.finish(
                run,
                ExecutionState.FAILED,
                error_message=f"task {execution.task!r} is not registered on this server",
            )
            return None
        try:
            # run.started stays when the execution became RUNNING: the time every reply and
            # event has shown (a synchronous task may still wait for a thread after it).
            return self._executor.start(definition, execution.args)
        except Exception as error:  # calling it failed (wrong arguments, say)
            self._fail(run, error)
            return None

    async def _await_outcome(self, run: Run, work: Work) -> None:
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
        self._outcomes.finish(run, state, error_message=message, keeps_slot=not work.done.done())
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

    def _settle(self, run: Run, done: asyncio.Future[Any]) -> None:
        """Records the outcome of a task that ended by itself."""
        if done.cancelled():
            self._outcomes.finish(
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
                self._outcomes.finish(run, ExecutionState.SUCCEEDED, result=result)
            return
        self._fail(run, error)

    def _fail(self, run: Run, error: BaseException) -> None:
        failure = Failure.of(error)
        self._outcomes.finish(
            run,
            ExecutionState.FAILED,
            error_message=failure.message,
            error_traceback=failure.traceback,
            error_type=failure.type,
        )
        self._retry(run.execution, run.policy.retry, failure.types)

    def _late(self, run: Run, done: asyncio.Future[Any]) -> None:
        """A task that outlived its execution's final state has ended: keep what it did as a
        note, and give its slot back."""
        shared = self._shared
        shared.lingering -= 1
        if done.cancelled():
            outcome = "was cancelled"
        elif (error := done.exception()) is not None:
            outcome = f"raised {type(error).__name__}: {error}"
        else:
            outcome = f"returned {json.dumps(done.result(), default=repr)[:MAX_NOTE_CHARS]}"
        when = shared.clock().isoformat()
        final = run.final.value if run.final else "ended"
        self._outcomes.release(
            run, f"after the execution was {final}, the task {outcome} at {when}"
        )
        if shared.backlog:
            shared.wake.set()
