"""The storage contract, run against every backend (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from chronoplane.server.errors import (
    EtagMismatch,
    ExecutionNotFound,
    JobAlreadyExists,
    JobNotFound,
)
from chronoplane.server.ids import new_execution_id
from chronoplane.server.models import (
    CronTrigger,
    DateTrigger,
    Execution,
    ExecutionQuery,
    ExecutionSource,
    ExecutionState,
    IntervalTrigger,
    Job,
)
from chronoplane.server.storage.abc import ExecutionFinish, ExecutionStart, NextRun
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore

T0 = datetime(2026, 3, 8, 6, 30, tzinfo=UTC)


def a_job(job_id: str = "j1", **changes: object) -> Job:
    job = Job(
        id=job_id,
        task="chronoplane.echo",
        trigger=CronTrigger(expression="30 2 * * *", time_zone="America/New_York"),
        args={"nested": {"list": [1, 2.5, "three", None, True]}},
        labels={"team": "data"},
        next_run_time=T0,
    )
    return replace(job, **changes)  # type: ignore[arg-type]


def an_execution(job_id: str = "j1", **changes: object) -> Execution:
    execution = Execution(
        id=new_execution_id(),
        job_id=job_id,
        state=ExecutionState.PENDING,
        source=ExecutionSource.SCHEDULE,
        scheduled_time=T0,
        create_time=datetime.now(UTC),
        task="chronoplane.echo",
        args={},
        instance_id="inst-test",
    )
    return replace(execution, **changes)  # type: ignore[arg-type]


async def test_jobs_round_trip_every_field_and_trigger_kind(store: SqlAlchemyStore) -> None:
    triggers = [
        CronTrigger(expression="*/5 * * * *", time_zone="Europe/Berlin"),
        IntervalTrigger(
            every=timedelta(seconds=90), start_time=T0, end_time=T0 + timedelta(days=1)
        ),
        IntervalTrigger(every=timedelta(hours=1)),
        DateTrigger(run_time=T0),
    ]
    for n, trigger in enumerate(triggers):
        job = a_job(f"j{n}", trigger=trigger, misfire_grace=timedelta(seconds=12.5))
        stored = await store.create_job(job, request_id=None)
        assert stored == replace(
            job, version=1, create_time=stored.create_time, update_time=stored.create_time
        )
        assert stored.create_time is not None and stored.create_time.tzinfo is UTC
        assert await store.get_job(job.id) == stored


async def test_a_taken_id_or_request_id_is_refused(store: SqlAlchemyStore) -> None:
    await store.create_job(a_job("a"), request_id="req-1")
    with pytest.raises(JobAlreadyExists):
        await store.create_job(a_job("a"), request_id=None)
    with pytest.raises(JobAlreadyExists):
        await store.create_job(a_job("b"), request_id="req-1")
    found = await store.get_job_by_request_id("req-1")
    assert found is not None and found.id == "a"
    assert await store.get_job_by_request_id("req-2") is None


async def test_update_is_compare_and_swap_on_the_version(store: SqlAlchemyStore) -> None:
    stored = await store.create_job(a_job(), request_id=None)
    updated = await store.update_job(replace(stored, description="new"), expected_version=1)
    assert updated.version == 2 and updated.description == "new"
    with pytest.raises(EtagMismatch):
        await store.update_job(replace(stored, description="lost"), expected_version=1)
    with pytest.raises(JobNotFound):
        await store.update_job(a_job("ghost"), expected_version=1)
    assert (await store.get_job("j1")).description == "new"


async def test_delete_takes_executions_along(store: SqlAlchemyStore) -> None:
    await store.create_job(a_job(), request_id=None)
    execution = an_execution()
    assert await store.insert_executions([execution]) == {execution.id}
    with pytest.raises(EtagMismatch):
        await store.delete_job("j1", expected_version=7)
    await store.delete_job("j1", expected_version=1)
    with pytest.raises(ExecutionNotFound):
        await store.get_execution(execution.id)
    with pytest.raises(JobNotFound):
        await store.delete_job("j1", expected_version=None)


async def test_list_jobs_pages_by_id(store: SqlAlchemyStore) -> None:
    for job_id in ["c", "a", "b", "d"]:
        await store.create_job(a_job(job_id, paused=job_id == "b"), request_id=None)
    first = await store.list_jobs(after=None, limit=3)
    assert [j.id for j in first.jobs] == ["a", "b", "c"] and first.next_after == "c"
    second = await store.list_jobs(after=first.next_after, limit=3)
    assert [j.id for j in second.jobs] == ["d"] and second.next_after is None
    assert sorted(j.id for j in await store.list_schedulable_jobs()) == ["a", "c", "d"]


async def test_one_execution_per_scheduled_fire_and_per_request_id(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(), request_id=None)
    first, duplicate = an_execution(), an_execution()
    assert await store.insert_executions([first]) == {first.id}
    assert await store.insert_executions([duplicate]) == set()
    manual = [
        an_execution(source=ExecutionSource.MANUAL, request_id="r1"),
        an_execution(source=ExecutionSource.MANUAL, request_id="r1"),
        an_execution(source=ExecutionSource.MANUAL),
        an_execution(source=ExecutionSource.MANUAL),
    ]
    inserted = await store.insert_executions(manual)
    assert inserted == {manual[0].id, manual[2].id, manual[3].id}
    found = await store.get_execution_by_request_id("j1", "r1")
    assert found is not None and found.id == manual[0].id


async def test_concurrent_inserts_of_the_same_fire_leave_one(store: SqlAlchemyStore) -> None:
    await store.create_job(a_job(), request_id=None)
    results = await asyncio.gather(*(store.insert_executions([an_execution()]) for _ in range(8)))
    assert sum(len(r) for r in results) == 1


async def test_executions_of_a_deleted_job_are_dropped(store: SqlAlchemyStore) -> None:
    await store.create_job(a_job("kept"), request_id=None)
    kept, orphan = an_execution("kept"), an_execution("deleted")
    assert await store.insert_executions([kept, orphan]) == {kept.id}


async def test_next_run_applies_only_to_the_version_it_was_computed_for(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(), request_id=None)
    later = T0 + timedelta(days=1)
    await store.record_progress([], [], [NextRun(job_id="j1", version=1, next_run_time=later)])
    assert (await store.get_job("j1")).next_run_time == later
    await store.update_job(a_job(next_run_time=T0), expected_version=1)
    await store.record_progress([], [], [NextRun(job_id="j1", version=1, next_run_time=None)])
    assert (await store.get_job("j1")).next_run_time == T0


async def test_progress_moves_forward_and_the_first_final_state_wins(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(), request_id=None)
    execution = an_execution()
    await store.insert_executions([execution])
    started = datetime.now(UTC)
    await store.record_progress([ExecutionStart(id=execution.id, start_time=started)], [])
    running = await store.get_execution(execution.id)
    assert running.state is ExecutionState.RUNNING and running.start_time == started
    ended = started + timedelta(seconds=2)
    await store.record_progress(
        [],
        [
            ExecutionFinish(
                id=execution.id,
                state=ExecutionState.SUCCEEDED,
                start_time=started,
                end_time=ended,
                result={"rows": 3, "ok": [True, None]},
            )
        ],
    )
    late = ExecutionFinish(
        id=execution.id, state=ExecutionState.FAILED, start_time=started, end_time=ended
    )
    await store.record_progress([ExecutionStart(id=execution.id, start_time=ended)], [late])
    done = await store.get_execution(execution.id)
    assert done.state is ExecutionState.SUCCEEDED
    assert done.result == {"rows": 3, "ok": [True, None]}
    assert done.start_time == started and done.duration == timedelta(seconds=2)
    assert job_summary_matches(await store.get_job("j1"), done)


def job_summary_matches(job: Job, execution: Execution) -> bool:
    summary = job.last_execution
    return (
        summary is not None
        and summary.id == execution.id
        and summary.state is execution.state
        and summary.end_time == execution.end_time
    )


async def test_list_executions_filters_and_orders_newest_first(store: SqlAlchemyStore) -> None:
    for job_id in ("a", "b"):
        await store.create_job(a_job(job_id), request_id=None)
    rows = []
    for n in range(6):
        rows.append(
            an_execution(
                "a" if n % 2 else "b",
                scheduled_time=T0 + timedelta(minutes=n),
                state=ExecutionState.FAILED if n == 3 else ExecutionState.PENDING,
            )
        )
        await asyncio.sleep(0.002)  # distinct milliseconds in the ids
    await store.insert_executions(rows)
    everything = await store.list_executions(ExecutionQuery(), before=None, limit=100)
    assert [e.id for e in everything.executions] == [r.id for r in reversed(rows)]
    only_a = await store.list_executions(ExecutionQuery(job_id="a"), before=None, limit=2)
    assert [e.id for e in only_a.executions] == [rows[5].id, rows[3].id]
    rest = await store.list_executions(
        ExecutionQuery(job_id="a"), before=only_a.next_before, limit=2
    )
    assert [e.id for e in rest.executions] == [rows[1].id] and rest.next_before is None
    failed = await store.list_executions(
        ExecutionQuery(states=frozenset({ExecutionState.FAILED})), before=None, limit=10
    )
    assert [e.id for e in failed.executions] == [rows[3].id]
    window = await store.list_executions(
        ExecutionQuery(
            scheduled_after=T0 + timedelta(minutes=2), scheduled_before=T0 + timedelta(minutes=4)
        ),
        before=None,
        limit=10,
    )
    assert [e.id for e in window.executions] == [rows[3].id, rows[2].id]


async def test_interrupt_unfinished_touches_only_pending_and_running(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(), request_id=None)
    states = [ExecutionState.PENDING, ExecutionState.RUNNING, ExecutionState.SUCCEEDED]
    rows = [
        an_execution(state=state, scheduled_time=T0 + timedelta(minutes=n))
        for n, state in enumerate(states)
    ]
    await store.insert_executions(rows)
    now = datetime.now(UTC)
    assert await store.interrupt_unfinished(message="server died", now=now) == 2
    after = [await store.get_execution(r.id) for r in rows]
    assert [e.state for e in after] == [
        ExecutionState.INTERRUPTED,
        ExecutionState.INTERRUPTED,
        ExecutionState.SUCCEEDED,
    ]
    assert after[0].error_message == "server died" and after[0].end_time == now


async def test_the_secret_is_created_once(store: SqlAlchemyStore) -> None:
    first = await store.get_or_create_secret("k", b"one")
    second = await store.get_or_create_secret("k", b"two")
    assert first == second == b"one"


async def test_progress_of_many_executions_is_written_in_one_call(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(), request_id=None)
    rows = [an_execution(scheduled_time=T0 + timedelta(seconds=n)) for n in range(50)]
    await store.insert_executions(rows)
    now = datetime.now(UTC)
    await store.record_progress(
        [ExecutionStart(id=r.id, start_time=now) for r in rows[:25]],
        [
            ExecutionFinish(
                id=r.id, state=ExecutionState.SUCCEEDED, start_time=now, end_time=now, result=n
            )
            for n, r in enumerate(rows[25:])
        ],
    )
    states = [(await store.get_execution(r.id)).state for r in rows]
    assert states == [ExecutionState.RUNNING] * 25 + [ExecutionState.SUCCEEDED] * 25
    assert (await store.get_execution(rows[-1].id)).result == 24
