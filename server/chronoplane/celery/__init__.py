"""Chronoplane tasks on Celery workers: ``pip install 'chronoplane[celery]'`` on the workers.

.. code-block:: python

    from celery import Celery
    from chronoplane.celery import Chronoplane

    app = Celery("reports", broker="redis://localhost:6379/0")
    chronoplane = Chronoplane(app, database_url="postgresql+asyncpg://…")

    @chronoplane.task("reports.nightly")
    def nightly(day: str = "") -> dict:
        ...

A job with ``executor: EXECUTOR_CELERY`` and ``task: "reports.nightly"`` is then sent to the
broker at each fire, with the execution's args as keyword arguments and the execution id as
the Celery task id. The wrapper around the function writes the execution's story to the
Chronoplane database itself, as an inline run's is written (watchers see it the same way):

1. *Start*, a conditional claim: the execution becomes RUNNING on this worker only if it is
   still PENDING. A message delivered again (``acks_late``: a worker died before it
   acknowledged) finds it RUNNING or ended and is acknowledged without running anything, so
   an execution never runs twice; a cancelled one is never started.
2. *Lease*: while the function runs, a thread renews the worker's lease on the execution.
   A worker that dies stops renewing; the server's leader then records the execution
   ABANDONED (and retries it if the job's retry policy says so).
3. *End*: SUCCEEDED with the result (JSON), or FAILED with the error, its type and the
   traceback, or TIMED_OUT past the job's timeout (Celery's soft time limit); a retry is
   queued as the job's retry policy says. An execution cancelled meanwhile stays CANCELLED.

With the database away (or a conflict) at the start, the message goes back to the broker
(a Reject with requeue, after a second) and comes again; the end is tried again for up to
15 s (half the lease at most), the lease renewed meanwhile. Nothing is left PENDING with
no one to send it, and a run whose outcome is known is not left to be ABANDONED.

Each step runs its coroutine with :func:`run_async`, which works in prefork and gevent
workers alike. A prefork (or solo) process keeps one store from task to task; elsewhere the
database engine is made and disposed inside the coroutine, and the result is returned after
its ``finally`` block (decision 0014).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn, TypeVar

from chronoplane.server import tracing
from chronoplane.server.errors import StorageConflict, StorageUnavailable
from chronoplane.server.logs import brief
from chronoplane.server.models import Execution, ExecutionState, RunPolicy
from chronoplane.server.runner import Failure, json_result, retry_of
from chronoplane.server.storage.abc import Admission, ExecutionFinish
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore

__all__ = ["DEFAULT_LEASE", "Chronoplane", "run_async"]

log = logging.getLogger("chronoplane.celery")

T = TypeVar("T")

# A worker's lease on an execution it runs: renewed every third of it.
DEFAULT_LEASE = timedelta(seconds=30)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine to its end from a Celery task, whatever the pool (the seeds'
    ``_run_async``, made safe for gevent).

    In a gevent worker every greenlet shares one OS thread, and asyncio's idea of the
    running loop is per OS thread: a second greenlet would find the first one's loop
    "running" (and ``asyncio.run`` on a patched, greenlet-based thread refuses). So there
    the coroutine runs in a fresh loop on one of gevent's native threads, the greenlet
    waiting cooperatively. Elsewhere: with a loop running in this thread, in a fresh loop
    on a thread of its own; otherwise on this thread's loop, made if there is none or it
    was closed, and left open for the next task.
    """
    if _gevent_patched():
        import gevent

        result: T = gevent.get_hub().threadpool.apply(asyncio.run, (coro,))
        return result
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
            return executor.submit(asyncio.run, coro).result()
    try:
        loop = asyncio.get_event_loop_policy().get_event_loop()
        if loop.is_closed():
            raise RuntimeError("closed")
    except RuntimeError:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
    return loop.run_until_complete(coro)


def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("threading"))


@dataclass(frozen=True)
class _Outcome:
    state: ExecutionState
    result: Any = None
    error_message: str = ""
    error_traceback: str = ""
    error_type: str = ""
    retry_as: tuple[str, ...] = ()
    """The error types a job's retry_on is matched against."""


class Chronoplane:
    """Registers Chronoplane tasks on a Celery app, and sets what they rely on:
    ``task_acks_late`` with ``task_reject_on_worker_lost`` (a message is taken back when the
    worker dies before the task ends) and a prefetch of one."""

    def __init__(
        self,
        app: Any,
        *,
        database_url: str | None = None,
        lease: timedelta = DEFAULT_LEASE,
    ) -> None:
        url = database_url or os.environ.get("CHRONOPLANE_DATABASE_URL")
        if not url:
            raise ValueError(
                "chronoplane.celery needs the Chronoplane database: database_url= or "
                "CHRONOPLANE_DATABASE_URL"
            )
        self.app = app
        self.database_url = url
        # Each execution's span, through the tracer provider the worker sets up (if any).
        tracing.install_if_available()
        self.lease = lease
        # (pid, loop, store): the prefork process's store, on its main thread's loop.
        self._kept: tuple[int, asyncio.AbstractEventLoop, SqlAlchemyStore] | None = None
        from celery.signals import worker_process_shutdown

        worker_process_shutdown.connect(self._close_process_store, weak=False)
        app.conf.update(
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            worker_prefetch_multiplier=1,
        )

    def task(self, name: str, **options: Any) -> Callable[[Callable[..., Any]], Any]:
        """A decorator: the function becomes the Celery task ``name`` (what a job's ``task``
        names), run as an execution. ``options`` go to ``app.task``."""

        def register(function: Callable[..., Any]) -> Any:
            def run(celery_task: Any, **kwargs: Any) -> Any:
                return self._run(celery_task, function, kwargs)

            run.__name__ = getattr(function, "__name__", name)
            run.__doc__ = function.__doc__
            return self.app.task(name=name, bind=True, **options)(run)

        return register

    # -- one execution ---------------------------------------------------------------------

    def _run(self, celery_task: Any, function: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        execution_id: str = celery_task.request.id
        worker = _worker_name(celery_task)
        try:
            started = run_async(self._start(execution_id, worker))
        except (StorageUnavailable, StorageConflict) as error:
            _give_back(execution_id, error)
        if started is None:
            log.info(
                "execution %s was started before, cancelled or has ended: this delivery of "
                "its task is acknowledged without running it",
                execution_id,
            )
            return None
        execution, policy = started
        # The lease is renewed until the end is recorded, retries of the end included.
        lease = _Lease(self, execution_id, worker)
        lease.start()
        try:
            with tracing.execution_span(execution, executor="celery", worker=worker) as traced:
                outcome = _call(function, kwargs, policy.timeout)
                traced(outcome.state, outcome.error_message)
            self._record_end(execution, policy, outcome)
        finally:
            lease.stop()
        return outcome.result

    def _record_end(self, execution: Execution, policy: RunPolicy, outcome: _Outcome) -> None:
        """The end, tried again for a while if the database does not answer: the run is
        over and its outcome known, and an end never recorded would leave the execution to
        be ABANDONED when its lease runs out. For half the lease, and at most
        ``END_RETRY_SECONDS``: a run past its soft time limit is killed by Celery's hard limit
        30 s later (executors/celery.py, HARD_LIMIT_GRACE)."""
        seconds = min(self.lease.total_seconds() / 2, END_RETRY_SECONDS)
        deadline = time.monotonic() + seconds
        delay = 0.5
        while True:
            try:
                run_async(self._finish(execution, policy, outcome))
                return
            except Exception as error:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "could not record the end of execution %s (%s); trying again in %.1f s",
                    execution.id,
                    brief(error),
                    delay,
                )
                time.sleep(delay)
                delay *= 2

    async def _using_store(self, work: Callable[[SqlAlchemyStore], Awaitable[T]]) -> T:
        """``work`` with a store: the process's own on a prefork (or solo) worker's main
        thread, whose loop ``run_async`` keeps open from task to task; otherwise one of its
        own, disposed inside this coroutine (before the loop that runs it may close), the
        result returned after the ``finally``."""
        kept = self._process_store()
        if kept is not None:
            return await work(kept)
        store = SqlAlchemyStore.from_url(self.database_url)
        try:
            result = await work(store)
        finally:
            await store.close()
        return result

    def _process_store(self) -> SqlAlchemyStore | None:
        """The store kept for this process's tasks, made on first use after the fork and
        again if the main thread's loop was replaced; None where a store cannot outlive the
        call (gevent, other threads)."""
        if _gevent_patched() or threading.current_thread() is not threading.main_thread():
            return None
        loop = asyncio.get_running_loop()
        kept = self._kept
        if kept is None or kept[0] != os.getpid() or kept[1] is not loop:
            kept = self._kept = (os.getpid(), loop, SqlAlchemyStore.from_url(self.database_url))
        return kept[2]

    def _close_process_store(self, **_: Any) -> None:
        """At the worker process's end (Celery's worker_process_shutdown)."""
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] == os.getpid() and not kept[1].is_closed():
            kept[1].run_until_complete(kept[2].close())

    async def _start(self, execution_id: str, worker: str) -> tuple[Execution, RunPolicy] | None:
        until = datetime.now(UTC) + self.lease
        return await self._using_store(
            lambda store: store.start_dispatched(execution_id, worker=worker, lease_until=until)
        )

    async def _renew(self, execution_id: str, worker: str) -> bool:
        until = datetime.now(UTC) + self.lease
        return await self._using_store(
            lambda store: store.renew_lease(execution_id, worker=worker, until=until)
        )

    async def _finish(self, execution: Execution, policy: RunPolicy, outcome: _Outcome) -> None:
        async def finish(store: SqlAlchemyStore) -> None:
            end = ExecutionFinish(
                id=execution.id,
                job_id=execution.job_id,
                state=outcome.state,
                start_time=execution.start_time,
                end_time=datetime.now(UTC),
                result=outcome.result,
                error_message=outcome.error_message,
                error_traceback=outcome.error_traceback,
                error_type=outcome.error_type,
            )
            await store.record_progress([end])
            failed = outcome.state in (ExecutionState.FAILED, ExecutionState.TIMED_OUT)
            if not failed or not policy.retry.retries(execution.attempt, outcome.retry_as):
                return
            ended = await store.get_execution(execution.id)
            # Only the attempt whose end this was is retried (not one cancelled meanwhile).
            if ended.state is outcome.state:
                retry = retry_of(ended, policy.retry, now=datetime.now(UTC), instance_id="")
                await store.admit_executions([Admission(execution=retry)])

        await self._using_store(finish)


# A start the database did not take is given back to the broker after this pause, so that a
# worker does not spin on a database that is away.
GIVE_BACK_SECONDS = 1.0
# The longest a worker tries again to record a run's end.
END_RETRY_SECONDS = 15.0


def _give_back(execution_id: str, error: Exception) -> NoReturn:
    """The database did not take the start (away, or a conflict): the message goes back to
    the queue (Celery's Reject with requeue; acknowledged as a failed task it would leave the
    execution PENDING with no one to send it again), to be delivered again, to this worker
    or another, once the database answers. Any other error fails the task, as before: it
    would fail again at every delivery. Should the start have committed unseen, the next
    delivery finds the execution RUNNING and drops it, and its lease, never renewed, ends
    it ABANDONED."""
    from celery.exceptions import Reject

    log.warning(
        "could not start execution %s (%s): its message goes back to the queue",
        execution_id,
        brief(error),
    )
    time.sleep(GIVE_BACK_SECONDS)
    # Celery logs a Reject with its traceback: that of the Reject alone, the reason in it.
    raise Reject(brief(error), requeue=True) from None


def _worker_name(celery_task: Any) -> str:
    hostname = getattr(celery_task.request, "hostname", None) or socket.gethostname()
    return f"{hostname}/{os.getpid()}"


class _TimedOut(Exception):
    """The job's timeout passed in a gevent worker."""


def _call(
    function: Callable[..., Any], kwargs: dict[str, Any], timeout: timedelta | None
) -> _Outcome:
    """Runs the task's function. Its timeout is Celery's soft time limit (set when the task
    was sent) in a prefork worker; a gevent worker has no time limits, so there the wrapper
    keeps it (a greenlet that never yields cannot be stopped, gevent's rule)."""
    from celery.exceptions import SoftTimeLimitExceeded

    try:
        with _greenlet_timeout(timeout):
            value = function(**kwargs)
            if inspect.isawaitable(value):
                value = run_async(_awaited(value))
        return _Outcome(ExecutionState.SUCCEEDED, result=json_result(value))
    except (SoftTimeLimitExceeded, _TimedOut) as error:
        return _Outcome(
            ExecutionState.TIMED_OUT,
            error_message="timed out: the job's timeout passed",
            error_traceback=Failure.of(error).traceback,
            # As an inline run that timed out.
            retry_as=("builtins.TimeoutError", "builtins.OSError"),
        )
    except Exception as error:
        failure = Failure.of(error)
        return _Outcome(
            ExecutionState.FAILED,
            error_message=failure.message[:4096],
            error_traceback=failure.traceback,
            error_type=failure.type,
            retry_as=failure.types,
        )


def _greenlet_timeout(timeout: timedelta | None) -> Any:
    if timeout is None or not _gevent_patched():
        return contextlib.nullcontext()
    import gevent

    return gevent.Timeout(timeout.total_seconds(), _TimedOut)


async def _awaited(value: Any) -> Any:
    return await value


class _Lease(threading.Thread):
    """Renews the worker's lease on an execution every third of the lease while it runs."""

    def __init__(self, owner: Chronoplane, execution_id: str, worker: str) -> None:
        super().__init__(name=f"chronoplane-lease-{execution_id}", daemon=True)
        self._owner = owner
        self._execution_id = execution_id
        self._worker = worker
        self._stopped = threading.Event()

    def run(self) -> None:
        every = self._owner.lease.total_seconds() / 3
        while not self._stopped.wait(every):
            try:
                if not run_async(self._owner._renew(self._execution_id, self._worker)):
                    if self._stopped.wait(1.0):
                        return  # the end was recorded just now: the run is over
                    log.warning(
                        "execution %s is no longer this worker's (cancelled, or abandoned "
                        "after a lost lease): what it does now is not recorded",
                        self._execution_id,
                    )
                    return
            except Exception as error:
                log.warning("could not renew the lease on %s: %s", self._execution_id, error)

    def stop(self) -> None:
        self._stopped.set()
