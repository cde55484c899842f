"""Reads take their pooled connection without a pre-ping (PostgreSQL): one that turns out
dead is dropped and the read runs again, once, on a fresh one; a database that is really
gone is still StorageUnavailable (docs/decisions/0019-fast-reads.md). The single-statement
writes of a Celery worker likewise."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from dbproxy import Gate
from sqlalchemy.engine import make_url
from storage.helpers import T0, a_job, an_execution

from chronoplane.server.errors import JobNotFound, StorageUnavailable
from chronoplane.server.models import ExecutionQuery, ExecutionState, ExecutorKind
from chronoplane.server.storage.abc import ExecutionFinish
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore

# PostgreSQL only: SQLite has no connections to lose.
postgres_only = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)


async def _terminate_others(url: str) -> int:
    """Ends every other session on the store's database, as a restart would."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(False)
    conn = await asyncpg.connect(dsn)
    try:
        ended: int = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return ended
    finally:
        await conn.close()


@postgres_only
async def test_reads_run_again_on_a_fresh_connection_after_the_pooled_one_died(
    store: SqlAlchemyStore, database_url: str
) -> None:
    job = await store.create_job(a_job("j1"), request_id=None)
    execution = an_execution("j1", scheduled_time=T0 + timedelta(minutes=1))
    await store.insert_executions([execution])
    reads: dict[str, Callable[[], Awaitable[object]]] = {
        # On the driver's connection (Session._fetch) ...
        "get_job": lambda: store.get_job("j1"),
        "list_jobs": lambda: store.list_jobs(after=None, limit=10),
        # ... and through SQLAlchemy (Session._read).
        "get_execution": lambda: store.get_execution(execution.id),
        "list_executions": lambda: store.list_executions(
            ExecutionQuery(job_id="j1"), before=None, limit=10
        ),
        "list_executions_in_range": lambda: store.list_executions(
            ExecutionQuery(scheduled_after=T0), before=None, limit=10
        ),
    }
    for name, read in reads.items():
        first = await read()
        assert await _terminate_others(database_url) >= 1, name
        assert await read() == first, name
    assert (await store.get_job("j1")).id == job.id
    with pytest.raises(JobNotFound):
        await store.get_job("nope")


async def test_a_database_that_is_gone_is_unavailable_after_one_more_try(
    postgres_url: str,
) -> None:
    url = make_url(postgres_url)
    gate = Gate((url.host or "127.0.0.1", url.port or 5432))
    await gate.open()
    store = SqlAlchemyStore.from_url(url.set(port=gate.port).render_as_string(False))
    try:
        await store.create_job(a_job("j1"), request_id=None)
        await store.get_job("j1")
        await gate.close()
        for read in (
            lambda: store.get_job("j1"),
            lambda: store.list_jobs(after=None, limit=10),
            lambda: store.list_executions(ExecutionQuery(), before=None, limit=10),
        ):
            with pytest.raises(StorageUnavailable):
                await asyncio.wait_for(read(), 30)
    finally:
        await store.close()


@postgres_only
async def test_a_read_cancelled_mid_statement_leaves_no_busy_connection(
    store: SqlAlchemyStore,
) -> None:
    read = asyncio.create_task(store._fetch("SELECT pg_sleep(5)"))
    await asyncio.sleep(0.3)
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    for _ in range(3):  # whichever pooled connection comes next is usable
        assert [tuple(r) for r in await store._fetch("SELECT 1")] == [(1,)]


@postgres_only
async def test_a_worker_s_start_and_end_outlive_a_dead_pooled_connection(
    store: SqlAlchemyStore, database_url: str
) -> None:
    """Both run again on a fresh connection: a start knows a claim of its own that committed
    unseen by the lease it wrote; an end written twice stays as first written."""
    await store.create_job(a_job("c1", executor=ExecutorKind.CELERY), request_id=None)
    execution = an_execution("c1", executor=ExecutorKind.CELERY, instance_id="")
    await store.insert_executions([execution])
    until = datetime.now(UTC) + timedelta(seconds=30)
    assert await _terminate_others(database_url) >= 1
    started = await store.start_dispatched(execution.id, worker="w/1", lease_until=until)
    assert started is not None and started[0].state is ExecutionState.RUNNING
    # As the second run of a claim that committed unseen sees it: its own, by its lease.
    again = await store.start_dispatched(execution.id, worker="w/1", lease_until=until)
    assert again == started
    later = until + timedelta(microseconds=1)
    assert await store.start_dispatched(execution.id, worker="w/1", lease_until=later) is None
    assert await _terminate_others(database_url) >= 1
    now = datetime.now(UTC)
    end = ExecutionFinish(
        id=execution.id,
        job_id="c1",
        state=ExecutionState.SUCCEEDED,
        start_time=started[0].start_time,
        end_time=now,
    )
    await store.record_progress([end])
    assert (await store.get_execution(execution.id)).state is ExecutionState.SUCCEEDED
