"""Jobs: the store contract (storage/abc/jobs.py), on SQLite and PostgreSQL."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url
from storage.helpers import T0, a_job, an_execution

from chronoplane.server.errors import (
    EtagMismatch,
    ExecutionNotFound,
    JobAlreadyExists,
    JobNotFound,
)
from chronoplane.server.models import (
    CronTrigger,
    DateTrigger,
    DayMatch,
    EventKind,
    IntervalTrigger,
    Job,
)
from chronoplane.server.storage.abc import JobChange, JobDeletion, JobUpdate, NextRun
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore


async def test_jobs_round_trip_every_field_and_trigger_kind(store: SqlAlchemyStore) -> None:
    triggers = [
        CronTrigger(expression="*/5 * * * *", time_zone="Europe/Berlin"),
        CronTrigger(expression="@weekly", day_match=DayMatch.ALL),
        IntervalTrigger(
            every=timedelta(seconds=90), start_time=T0, end_time=T0 + timedelta(days=1)
        ),
        IntervalTrigger(every=timedelta(hours=1)),
        DateTrigger(run_time=T0),
        DateTrigger(
            run_time=datetime(2027, 3, 14, 7, tzinfo=UTC),
            local_time=datetime(2027, 3, 14, 2, 30),
            time_zone="America/New_York",
        ),
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


async def test_create_jobs_inserts_all_in_order_with_an_event_each(
    store: SqlAlchemyStore,
) -> None:
    ids = [f"bulk-{n:04d}" for n in range(1000)][::-1]  # not in id order
    new = [a_job(job_id, created_by="token:ci") for job_id in ids]
    request_ids = [f"req-{n}" if n % 2 else None for n in range(1000)]
    stored = await store.create_jobs(new, request_ids=request_ids)
    assert [job.id for job in stored] == ids
    assert all(job.version == 1 and job.created_by == "token:ci" for job in stored)
    assert stored[0] == await store.get_job(ids[0])
    assert stored[0] == replace(
        new[0], version=1, create_time=stored[0].create_time, update_time=stored[0].create_time
    )
    found = await store.get_jobs_by_request_ids(["req-1", "req-999", "req-2", "nope"])
    assert {key: job.id for key, job in found.items()} == {"req-1": ids[1], "req-999": ids[999]}
    events = await store.newest_events(0, limit=2000)
    assert [(e.job_id, e.kind) for e in events] == [(i, EventKind.ADDED) for i in ids]


async def test_create_jobs_is_all_or_nothing(store: SqlAlchemyStore) -> None:
    await store.create_job(a_job("taken"), request_id="req-taken")
    before = await store.newest_events(0, limit=100)
    cases: list[tuple[list[Job], list[str | None], str]] = [
        ([a_job("x"), a_job("y"), a_job("taken")], [None, None, None], "taken"),
        ([a_job("x"), a_job("y"), a_job("z")], [None, "req-taken", None], "y"),
    ]
    for new, request_ids, named in cases:
        with pytest.raises(JobAlreadyExists) as caught:
            await store.create_jobs(new, request_ids=request_ids)
        assert caught.value.job_id == named
    assert [job.id for job in (await store.list_jobs(after=None, limit=10)).jobs] == ["taken"]
    after = await store.newest_events(0, limit=100)
    assert [(e.cursor, e.job_id) for e in after] == [(e.cursor, e.job_id) for e in before]


async def test_update_is_compare_and_swap_on_the_version(store: SqlAlchemyStore) -> None:
    stored = await store.create_job(a_job(), request_id=None)
    updated = await store.update_job(replace(stored, description="new"), expected_version=1)
    assert updated.version == 2 and updated.description == "new"
    with pytest.raises(EtagMismatch):
        await store.update_job(replace(stored, description="lost"), expected_version=1)
    with pytest.raises(JobNotFound):
        await store.update_job(a_job("ghost"), expected_version=1)
    assert (await store.get_job("j1")).description == "new"


async def test_change_jobs_returns_each_outcome_and_fails_only_the_refused(
    store: SqlAlchemyStore,
) -> None:
    for job_id in ["a", "b", "c", "d", "e"]:
        await store.create_job(a_job(job_id), request_id=None)
    await store.insert_executions([an_execution("b")])
    before = await store.newest_events(0, limit=100)
    changes: list[JobChange] = [
        JobUpdate(job=a_job("d", description="d2"), expected_version=1),
        JobUpdate(job=a_job("c", description="lost"), expected_version=7),
        JobDeletion(job_id="a", expected_version=1),
        JobUpdate(job=a_job("ghost"), expected_version=1),
        JobUpdate(job=a_job("b", description="b2"), expected_version=1),
        JobDeletion(job_id="gone"),
        JobDeletion(job_id="e", expected_version=3),
    ]
    outcomes = await store.change_jobs(changes)
    assert [type(o).__name__ for o in outcomes] == [
        "Job",
        "EtagMismatch",
        "Job",
        "JobNotFound",
        "Job",
        "JobNotFound",
        "EtagMismatch",
    ]
    d, _, a, _, b, _, _ = outcomes
    assert d == await store.get_job("d") and isinstance(d, Job) and d.version == 2
    assert b == await store.get_job("b") and isinstance(b, Job) and b.last_execution
    assert isinstance(a, Job) and a.id == "a" and a.version == 1
    assert (await store.get_job("c")).version == 1
    with pytest.raises(JobNotFound):
        await store.get_job("a")
    events = (await store.newest_events(0, limit=100))[len(before) :]
    # One event per change made, in the order the transaction made them (by job id).
    assert [(e.job_id, e.kind) for e in events] == [
        ("a", EventKind.DELETED),
        ("b", EventKind.MODIFIED),
        ("d", EventKind.MODIFIED),
    ]
    with pytest.raises(ValueError):
        await store.change_jobs([JobDeletion(job_id="b"), JobDeletion(job_id="b")])


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


async def test_due_jobs_come_soonest_first_a_page_at_a_time(store: SqlAlchemyStore) -> None:
    """The leader's horizon: paused jobs and jobs without a next run are never due; a window
    (since, until] and a key page through the rest, ties broken by id."""
    times = {"e": 3, "a": 1, "c": 1, "b": 2, "p": 1, "f": 9}
    for job_id, minutes in times.items():
        when = T0 + timedelta(minutes=minutes)
        await store.create_job(
            a_job(job_id, paused=job_id == "p", next_run_time=when), request_id=None
        )
    await store.create_job(a_job("done", next_run_time=None), request_id=None)
    until = T0 + timedelta(minutes=3)
    first = await store.due_jobs(since=None, until=until, after=None, limit=2)
    assert [j.id for j in first] == ["a", "c"]
    last = first[-1]
    assert last.next_run_time is not None
    rest = await store.due_jobs(
        since=None, until=until, after=(last.next_run_time, last.id), limit=10
    )
    assert [j.id for j in rest] == ["b", "e"]
    window = await store.due_jobs(
        since=T0 + timedelta(minutes=1), until=until, after=None, limit=10
    )
    assert [j.id for j in window] == ["b", "e"]
    assert sorted(j.id for j in await store.get_jobs(["f", "p", "gone"])) == ["f", "p"]


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


async def test_the_due_jobs_query_reads_the_due_index_on_postgresql(postgres_url: str) -> None:
    """The leader fills its timer a page of due jobs at a time; each page must come from
    ix_jobs_due, not from a scan of every job (with 1,000,000 jobs a scan took 400 ms a page,
    and a restart 70 s: ``paused IS false`` does not match the index's ``NOT paused``)."""
    store = SqlAlchemyStore.from_url(postgres_url)
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    event.listen(store.engine.sync_engine, "before_cursor_execute", capture)
    try:
        await store.due_jobs(since=T0, until=T0 + timedelta(minutes=5), after=(T0, "a"), limit=9)
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", capture)
        await store.close()
    [(statement, parameters)] = statements
    conn = await asyncpg.connect(
        make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )
    try:
        await conn.execute("SET enable_seqscan = off")  # the cheapest plan the indexes allow
        plan = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {statement}", *parameters)
    finally:
        await conn.close()
    assert '"Index Name": "ix_jobs_due"' in plan, plan
