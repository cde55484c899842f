"""Cancellation, wherever the execution runs: a PENDING one is ended at once; a RUNNING one
here is asked to stop; one running on another instance gets a cancel request in the database
(and a NOTIFY), which its instance carries out, while the caller waits a while for it; one
on a Celery worker is ended here and its task revoked (docs/decisions/0010 and 0014)."""

from __future__ import annotations

import asyncio
import logging

from chronoplane.server import metrics
from chronoplane.server.errors import CancellationPending, ExecutionFinished
from chronoplane.server.models import Execution, ExecutionState, ExecutorKind
from chronoplane.server.runner.outcomes import Outcomes
from chronoplane.server.runner.state import Shared

__all__ = ["CANCEL_WAIT_SECONDS", "Cancels"]

log = logging.getLogger("chronoplane.server.runner")

# CancelExecution of a run on another instance waits this long for that instance to stop it.
CANCEL_WAIT_SECONDS = 10.0


class Cancels:
    def __init__(self, shared: Shared, outcomes: Outcomes) -> None:
        self._shared = shared
        self._outcomes = outcomes
        self.task: asyncio.Task[None] | None = None
        self._again = False

    async def cancel(self, execution_id: str, *, reason: str, by: str = "") -> Execution:
        """Stops an execution, wherever it runs: PENDING ones never start, RUNNING ones are
        cancelled by the instance running them.

        Raises ``ExecutionNotFound``, ``ExecutionFinished`` when it had already ended, or
        ``CancellationPending`` when the instance running it did not stop it in time.
        """
        shared = self._shared
        message = f"cancelled: {reason}" if reason else "cancelled"
        run = shared.runs.get(execution_id)
        if run is not None and run.final is None and not run.stop.done():
            run.cancelled_by = by
            run.request_stop(ExecutionState.CANCELLED, message)
            await run.finalized.wait()
            await self._outcomes.flush()
            current = await shared.store.get_execution(execution_id)
            if run.final is ExecutionState.CANCELLED:
                return current
            raise ExecutionFinished(execution_id, current.state.value)
        await self._outcomes.flush()
        request = await shared.store.request_cancel(
            execution_id, message=message, now=shared.clock(), by=by
        )
        if request.done:
            if request.execution.executor is ExecutorKind.INLINE:  # Celery's: census.py
                metrics.scheduling.ended(request.execution.task, "cancelled", "inline")
            await self.revoke(request.execution)
            return request.execution
        return await self._wait_for(execution_id, request.execution.instance_id)

    async def _wait_for(self, execution_id: str, owner: str) -> Execution:
        """Until the instance running it has stopped it, for a while."""
        shared = self._shared
        deadline = asyncio.get_running_loop().time() + CANCEL_WAIT_SECONDS
        while asyncio.get_running_loop().time() < deadline:
            if owner == shared.instance_id:
                await self.apply_requests()
            await asyncio.sleep(0.05)
            current = await shared.store.get_execution(execution_id)
            if current.state is ExecutionState.CANCELLED:
                return current
            if current.state is not ExecutionState.RUNNING:
                raise ExecutionFinished(execution_id, current.state.value)
        raise CancellationPending(execution_id, owner, CANCEL_WAIT_SECONDS)

    def notified(self, execution_id: str) -> None:
        """Someone asked (through any instance) to stop an execution that may run here."""
        if execution_id not in self._shared.runs:
            return
        if self.task is not None and not self.task.done():
            self._again = True
            return
        self.task = asyncio.create_task(self._apply_forever(), name="runner-cancels")

    async def _apply_forever(self) -> None:
        while True:
            self._again = False
            try:
                await self.apply_requests()
            except Exception as error:
                log.warning("reading cancel requests failed: %s", error)
            if not self._again:
                return

    async def apply_requests(self) -> None:
        """Asks the runs here that someone wants cancelled to stop."""
        runs = self._shared.runs
        requests = await self._shared.store.cancel_requests(list(runs))
        for execution_id, message in requests.items():
            run = runs.get(execution_id)
            if run is not None:
                run.request_stop(ExecutionState.CANCELLED, message)

    async def revoke(self, execution: Execution) -> None:
        """Stops the Celery task of an execution the server ended (cancelled, displaced)."""
        if execution.executor is not ExecutorKind.CELERY or not execution.celery_task_id:
            return
        revoke = self._shared.revoke
        if revoke is None:
            log.warning(
                "execution %s is cancelled, but this server has no Celery broker to revoke "
                "its task: a worker that has it finds it cancelled before it starts",
                execution.id,
            )
            return
        await revoke(execution.celery_task_id)
