"""Celery dispatches (storage/abc/dispatches.py): claimed to be sent, recorded as sent, and
the worker's conditional start, with the event each change appends; on SQLite and
PostgreSQL (where the start is one statement that builds the event's body itself)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from storage.helpers import a_job, an_execution

from chronoplane.server.models import (
    EventKind,
    EventResource,
    ExecutionState,
    ExecutorKind,
    RetryPolicy,
)
from chronoplane.server.storage.abc import Admission, ExecutionFinish
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore


async def test_a_worker_starts_a_sent_execution_once_and_its_event_is_the_row(
    store: SqlAlchemyStore,
) -> None:
    retry = RetryPolicy(max_attempts=3, initial_backoff=timedelta(seconds=2))
    job = a_job(executor=ExecutorKind.CELERY, timeout=timedelta(seconds=90), retry=retry)
    await store.create_job(job, request_id=None)
    # Microseconds of 0 and not: the body's times are text either way.
    scheduled = datetime(2026, 3, 8, 6, 30, 0, tzinfo=UTC)
    execution = an_execution(
        executor=ExecutorKind.CELERY,
        scheduled_time=scheduled,
        args={"text": "héllo", "n": [1, 2.5, None, True, {"deep": "x"}]},
        instance_id="",
    )
    await store.admit_executions([Admission(execution=execution, due_time=scheduled)])
    claim = await store.claim_dispatches(instance_id="inst-a", limit=10)
    assert [d.execution.id for d in claim.dispatches] == [execution.id]
    sent_at = datetime.now(UTC)
    await store.record_dispatches(instance_id="inst-a", sent=[(execution.id, sent_at)], failed=[])
    sent = await store.get_execution(execution.id)
    assert sent.dispatch_time == sent_at and sent.instance_id == ""

    before = (await store.event_window()).newest
    until = datetime.now(UTC) + timedelta(seconds=30)
    started = await store.start_dispatched(execution.id, worker="w1@host/7", lease_until=until)
    assert started is not None
    running, policy = started
    assert running.state is ExecutionState.RUNNING and running.worker == "w1@host/7"
    assert policy.timeout == timedelta(seconds=90) and policy.retry == retry
    read = await store.get_execution(execution.id)
    assert running == read
    # Its event carries the row as GetExecution reads it, whoever wrote the body.
    [event] = await store.newest_events(before, limit=10)
    assert (event.resource, event.kind, event.job_id) == (
        EventResource.EXECUTION,
        EventKind.MODIFIED,
        job.id,
    )
    assert event.labels == job.labels
    assert event.execution == read

    # A message delivered again finds it started: nothing runs, nothing is appended.
    again = await store.start_dispatched(execution.id, worker="w2@host/8", lease_until=until)
    assert again is None
    assert await store.newest_events(event.cursor, limit=10) == []
    assert (await store.get_execution(execution.id)).worker == "w1@host/7"

    # The end, as the worker records it: one event, the row as read.
    end = ExecutionFinish(
        id=execution.id,
        job_id=job.id,
        state=ExecutionState.FAILED,
        start_time=running.start_time,
        end_time=datetime.now(UTC),
        result={"partial": [1, 2]},
        error_message="boom",
        error_traceback="Traceback …",
        error_type="builtins.ValueError",
    )
    await store.record_progress([end])
    ended = await store.get_execution(execution.id)
    assert ended.state is ExecutionState.FAILED and ended.result == {"partial": [1, 2]}
    [event] = await store.newest_events(event.cursor, limit=10)
    assert event.execution == ended and event.labels == job.labels
    # A final state stays: a second end changes nothing and appends nothing.
    await store.record_progress([replace(end, state=ExecutionState.SUCCEEDED)])
    assert await store.get_execution(execution.id) == ended
    assert await store.newest_events(event.cursor, limit=10) == []
