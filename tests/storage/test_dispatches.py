"""Celery dispatches (storage/abc/dispatches.py): claimed to be sent, recorded as sent, and
the worker's conditional start, with the event each change appends; on SQLite and
PostgreSQL (where the start is one statement that builds the event's body itself)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from storage.helpers import T0, a_job, an_execution

from chronoplane.server.models import (
    EventKind,
    EventResource,
    ExecutionState,
    ExecutorKind,
    RetryPolicy,
)
from chronoplane.server.storage.abc import Admission, ExecutionFinish
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore

SECOND = timedelta(seconds=1)


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


async def test_a_worker_reads_only_its_execution_when_statistics_predate_the_burst(
    postgres_url: str,
) -> None:
    """A start or an end reads its own execution, not the burst it is part of. PostgreSQL's
    statistics are always older than a burst and count almost no pending executions; with
    them, the generic plans of the worker's statements read every pending execution of the
    burst through an index on state, for each start and each end: 20,000 pending made each
    start cost 2 ms (decision 0031). Counted from PostgreSQL's own index statistics."""
    admin = await asyncpg.connect(
        make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    store = SqlAlchemyStore.from_url(postgres_url)
    try:
        job = a_job(executor=ExecutorKind.CELERY, max_concurrent=0)
        await store.create_job(job, request_id=None)
        # What an installation has run for a while: finished executions, analyzed.
        await admin.execute(
            "INSERT INTO executions (id, job_id, state, source, scheduled_time, create_time, "
            "due_time, task, args, error_message, error_traceback, error_type, note, "
            "instance_id, attempt, ready, holds_slot, force, executor) "
            "SELECT 'old-' || n, $1, 'succeeded', 'schedule', now(), now(), now(), "
            "'chronoplane.echo', '{}', '', '', '', '', '', 1, false, false, false, 'celery' "
            "FROM generate_series(1, 5000) AS n",
            job.id,
        )
        await admin.execute("ANALYZE executions")
        burst = [
            an_execution(
                executor=ExecutorKind.CELERY, instance_id="", scheduled_time=T0 + n * SECOND
            )
            for n in range(1000)
        ]
        for first in range(0, len(burst), 500):
            chunk = burst[first : first + 500]
            await store.admit_executions([Admission(execution=e, due_time=T0) for e in chunk])
        before = await _index_reads(store)
        # More than five of each: PostgreSQL plans a statement's sixth run generically.
        for execution in burst[:12]:
            until = datetime.now(UTC) + timedelta(seconds=30)
            started = await store.start_dispatched(execution.id, worker="w/1", lease_until=until)
            assert started is not None
            end = ExecutionFinish(
                id=execution.id,
                job_id=job.id,
                state=ExecutionState.SUCCEEDED,
                start_time=started[0].start_time,
                end_time=datetime.now(UTC),
                result=None,
            )
            await store.record_progress([end])
        after = await _index_reads(store)
    finally:
        await store.close()
        await admin.close()
    by_key = after["pk_executions"] - before["pk_executions"]
    others = sum(after.values()) - sum(before.values()) - by_key
    assert by_key >= 24, (before, after)
    # A plan that reads the burst reads about 1,000 entries per statement.
    assert others <= 24, (before, after)


async def _index_reads(store: SqlAlchemyStore) -> dict[str, int]:
    """Index entries read in the executions table, by index, counting the store's own
    statements: its pooled connection (one, as the calls above come one at a time) is made
    to report its statistics now, not up to a second later."""
    async with store.engine.connect() as conn:
        await conn.execute(sa.text("SELECT pg_stat_force_next_flush()"))
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            sa.text(
                "SELECT indexrelname, idx_tup_read FROM pg_stat_user_indexes "
                "WHERE relname = 'executions'"
            )
        )
        return {name: int(read) for name, read in rows}
