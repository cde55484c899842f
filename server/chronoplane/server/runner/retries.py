"""Retries: a run that failed, timed out or was ABANDONED is tried again when its job's retry
policy says so. Each attempt is an execution of its own, PENDING and due once its backoff has
passed; it waits its turn for a slot like any other, and keeps its first attempt's identity
(its dedupe key is the first attempt's id and its number), so it is written once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime

from chronoplane.server.ids import new_execution_id
from chronoplane.server.models import (
    ABANDONED_ERROR_TYPE,
    Execution,
    ExecutionSource,
    ExecutionState,
    Job,
    RetryPolicy,
)
from chronoplane.server.runner.state import Shared
from chronoplane.server.storage.abc import Admission, Admitted

__all__ = ["Retries", "retry_of"]


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


Admit = Callable[[list[Admission]], Awaitable[Admitted | None]]


class Retries:
    def __init__(self, shared: Shared) -> None:
        self._shared = shared
        # Writes admissions, trying again until it can (admission.py; set by the runner).
        self.admit: Admit | None = None

    def retry(self, execution: Execution, policy: RetryPolicy, errors: tuple[str, ...]) -> bool:
        """Queues the next attempt if ``policy`` retries ``errors`` (qualified type names);
        returns whether it does."""
        shared = self._shared
        if shared.stopping or not policy.retries(execution.attempt, errors):
            return False
        retry = retry_of(execution, policy, now=shared.clock(), instance_id=shared.instance_id)
        # Queued as it is, due at the end of its backoff: it waits its turn for a slot.
        shared.spawn(self._queue(retry))
        return True

    def retry_abandoned(self, execution: Execution, job: Job) -> bool:
        """Retries an execution a dead instance abandoned, if the job's retry policy says so
        (its error type is chronoplane.Abandoned)."""
        return self.retry(execution, job.retry, (execution.error_type or ABANDONED_ERROR_TYPE,))

    async def _queue(self, retry: Execution) -> None:
        assert self.admit is not None, "the runner sets it"
        await self.admit([Admission(execution=retry)])
        self._shared.wake.set()
