"""The storage contract, run against every backend (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from chronoplane.server.errors import (
    EtagMismatch,
    ExecutionFinished,
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
    Instance,
    IntervalTrigger,
    Job,
    OverlapPolicy,
)
from chronoplane.server.storage.abc import Admission, ExecutionFinish, NextRun, SlotRelease
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore

T0 = datetime(2026, 3, 8, 6, 30, tzinfo=UTC)
TASK = "chronoplane.echo"


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
    queued = await store.get_execution(execution.id)
    assert queued.state is ExecutionState.PENDING and queued.instance_id == ""
    claim = await store.claim_executions(instance_id="inst-a", limit=10, tasks=[TASK])
    [(running, policy)] = claim.executions
    assert running.id == execution.id and policy.timeout is None
    assert running.state is ExecutionState.RUNNING and running.instance_id == "inst-a"
    started = running.start_time
    assert started is not None
    ended = started + timedelta(seconds=2)
    await store.record_progress(
        [
            ExecutionFinish(
                id=execution.id,
                job_id="j1",
                state=ExecutionState.SUCCEEDED,
                start_time=started,
                end_time=ended,
                result={"rows": 3, "ok": [True, None]},
            )
        ],
    )
    late = ExecutionFinish(
        id=execution.id,
        job_id="j1",
        state=ExecutionState.FAILED,
        start_time=started,
        end_time=ended,
    )
    await store.record_progress([late])
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


async def test_interrupt_unfinished_ends_running_ones_and_keeps_the_queue(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(max_concurrent=0), request_id=None)
    states = [ExecutionState.PENDING, ExecutionState.PENDING, ExecutionState.SUCCEEDED]
    rows = [
        an_execution(state=state, scheduled_time=T0 + timedelta(minutes=n))
        for n, state in enumerate(states)
    ]
    await store.insert_executions(rows)
    await store.claim_executions(instance_id="inst-a", limit=1, tasks=[TASK])
    now = datetime.now(UTC)
    assert await store.interrupt_unfinished(message="server died", now=now) == 1
    after = [await store.get_execution(r.id) for r in rows]
    assert [e.state for e in after] == [
        ExecutionState.INTERRUPTED,
        ExecutionState.PENDING,
        ExecutionState.SUCCEEDED,
    ]
    assert after[0].error_message == "server died" and after[0].end_time == now
    # The slot is free again: the queued one can be claimed.
    claim = await store.claim_executions(instance_id="inst-b", limit=5, tasks=[TASK])
    assert [e.id for e, _ in claim.executions] == [rows[1].id]


async def test_the_secret_is_created_once(store: SqlAlchemyStore) -> None:
    first = await store.get_or_create_secret("k", b"one")
    second = await store.get_or_create_secret("k", b"two")
    assert first == second == b"one"


async def test_progress_of_many_executions_is_written_in_one_call(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(max_concurrent=0), request_id=None)
    rows = [an_execution(scheduled_time=T0 + timedelta(seconds=n)) for n in range(50)]
    await store.insert_executions(rows)
    claim = await store.claim_executions(instance_id="inst-a", limit=50, tasks=[TASK])
    assert len(claim.executions) == 50
    now = datetime.now(UTC)
    await store.record_progress(
        [
            ExecutionFinish(
                id=r.id,
                job_id="j1",
                state=ExecutionState.SUCCEEDED,
                start_time=now,
                end_time=now,
                result=n,
            )
            for n, r in enumerate(rows[25:])
        ],
    )
    states = [(await store.get_execution(r.id)).state for r in rows]
    assert states == [ExecutionState.RUNNING] * 25 + [ExecutionState.SUCCEEDED] * 25
    assert (await store.get_execution(rows[-1].id)).result == 24


# -- the queue (docs/decisions/0010-execution-queue.md) ------------------------------------------


async def claimed_ids(
    store: SqlAlchemyStore, instance: str = "inst-a", limit: int = 100
) -> list[str]:
    claim = await store.claim_executions(instance_id=instance, limit=limit, tasks=[TASK])
    return [e.id for e, _ in claim.executions]


def finish(execution: Execution, *, keeps_slot: bool = False) -> ExecutionFinish:
    """A final state for ``execution`` (SUCCEEDED, or TIMED_OUT with its thread running)."""
    now = datetime.now(UTC)
    return ExecutionFinish(
        id=execution.id,
        job_id=execution.job_id,
        state=ExecutionState.TIMED_OUT if keeps_slot else ExecutionState.SUCCEEDED,
        start_time=now,
        end_time=now,
        keeps_slot=keeps_slot,
    )


async def test_claims_take_at_most_the_free_slots_oldest_first(store: SqlAlchemyStore) -> None:
    await store.create_job(a_job("two", max_concurrent=2), request_id=None)
    await store.create_job(a_job("free", max_concurrent=0), request_id=None)
    rows = [an_execution("two", scheduled_time=T0 + timedelta(seconds=n)) for n in range(4)]
    rows += [an_execution("free", scheduled_time=T0 + timedelta(seconds=n)) for n in range(3)]
    await store.insert_executions(rows)
    first = await claimed_ids(store)
    assert sorted(first) == sorted([rows[0].id, rows[1].id, *(r.id for r in rows[4:])])
    assert await claimed_ids(store, "inst-b") == [], "the job's two slots are held"
    await store.record_progress([finish(rows[0])])
    assert await claimed_ids(store, "inst-b") == [rows[2].id]
    # A synchronous task past its timeout keeps its slot until its thread returns.
    await store.record_progress([finish(rows[1], keeps_slot=True)])
    assert await claimed_ids(store, "inst-b") == []
    await store.record_progress([], [SlotRelease(id=rows[1].id, job_id="two", note="returned 1")])
    assert await claimed_ids(store, "inst-b") == [rows[3].id]
    assert (await store.get_execution(rows[1].id)).note == "returned 1"


async def test_concurrent_claimers_never_exceed_max_concurrent(store: SqlAlchemyStore) -> None:
    """Four claimers finish what they take while new executions keep coming: the job never
    has more than its two slots' worth RUNNING, and every execution runs once."""
    await store.create_job(a_job("two", max_concurrent=2), request_id=None)
    total = 40
    rows = [an_execution("two", scheduled_time=T0 + timedelta(seconds=n)) for n in range(total)]
    ran: list[str] = []

    async def running_now() -> int:
        page = await store.list_executions(
            ExecutionQuery(job_id="two", states=frozenset({ExecutionState.RUNNING})),
            before=None,
            limit=100,
        )
        return len(page.executions)

    async def admitter() -> None:
        for n in range(0, total, 4):
            await store.insert_executions(rows[n : n + 4])
            await asyncio.sleep(0.003)

    async def claimer(name: str) -> None:
        while len(ran) < total:
            claim = await store.claim_executions(instance_id=name, limit=3, tasks=[TASK])
            assert await running_now() <= 2
            for execution, _ in claim.executions:
                ran.append(execution.id)
            await asyncio.sleep(0.002)
            await store.record_progress([finish(e) for e, _ in claim.executions])

    await asyncio.wait_for(
        asyncio.gather(admitter(), *(claimer(f"inst-{n}") for n in range(4))), 60
    )
    assert sorted(ran) == sorted(r.id for r in rows)


async def test_claims_wait_for_the_due_time_and_take_only_known_tasks(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(max_concurrent=0), request_id=None)
    later = datetime.now(UTC) + timedelta(seconds=30)
    soon = an_execution()
    other = an_execution(task="other.task", scheduled_time=T0 + timedelta(minutes=1))
    retry = an_execution(source=ExecutionSource.RETRY, scheduled_time=later)
    await store.admit_executions(
        [Admission(execution=soon), Admission(execution=other), Admission(execution=retry)]
    )
    claim = await store.claim_executions(instance_id="inst-a", limit=10, tasks=[TASK])
    assert [e.id for e, _ in claim.executions] == [soon.id]
    assert claim.next_due_in is not None
    assert timedelta(seconds=25) < claim.next_due_in <= timedelta(seconds=30)
    assert (await store.get_execution(other.id)).state is ExecutionState.PENDING


async def test_admission_applies_the_overlap_policy_to_what_the_database_holds(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(), request_id=None)

    async def admit(policy: OverlapPolicy, *, force: bool = False) -> Execution:
        execution = an_execution(source=ExecutionSource.MANUAL, scheduled_time=datetime.now(UTC))
        admitted = await store.admit_executions(
            [Admission(execution=execution, policy=policy, force=force)]
        )
        [written] = admitted.inserted
        return written

    first = await admit(OverlapPolicy.SKIP)
    assert first.state is ExecutionState.PENDING
    skipped = await admit(OverlapPolicy.SKIP)
    assert skipped.state is ExecutionState.SKIPPED
    assert skipped.error_message == "max_concurrent (1) executions were running"
    assert await claimed_ids(store) == [first.id]
    buffered = await admit(OverlapPolicy.BUFFER_ONE)
    assert buffered.state is ExecutionState.PENDING
    second_buffer = await admit(OverlapPolicy.BUFFER_ONE)
    assert second_buffer.state is ExecutionState.SKIPPED
    assert "already waiting" in second_buffer.error_message
    forced = await admit(OverlapPolicy.ALLOW, force=True)
    assert forced.state is ExecutionState.PENDING
    assert await claimed_ids(store) == [forced.id], "forced runs need no slot"
    newer = await store.admit_executions(
        [
            Admission(
                execution=an_execution(source=ExecutionSource.MANUAL),
                policy=OverlapPolicy.CANCEL_RUNNING,
            )
        ]
    )
    assert newer.displace == ["j1"]
    assert newer.inserted[0].state is ExecutionState.PENDING
    assert [e.id for e in await store.displace_oldest(newer.displace, now=T0)] == [first.id]
    assert [e.id for e in await store.displace_oldest(newer.displace, now=T0)] == [forced.id], (
        "the next oldest"
    )
    assert await store.cancel_requests([first.id, forced.id, buffered.id]) == {
        first.id: "cancelled for a newer run (overlap policy cancel_running)",
        forced.id: "cancelled for a newer run (overlap policy cancel_running)",
    }
    # Both stop: the newer one gets the slot.
    await store.record_progress([finish(first), finish(forced)])
    assert await claimed_ids(store) == [newer.inserted[0].id]


async def test_cancel_ends_a_queued_execution_and_asks_the_owner_of_a_running_one(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(), request_id=None)
    running, queued = an_execution(), an_execution(scheduled_time=T0 + timedelta(minutes=1))
    await store.insert_executions([running, queued])
    assert await claimed_ids(store) == [running.id]
    now = datetime.now(UTC)
    done = await store.request_cancel(queued.id, message="cancelled: no", now=now)
    assert done.done and done.execution.state is ExecutionState.CANCELLED
    asked = await store.request_cancel(running.id, message="cancelled: stop", now=now)
    assert not asked.done and asked.execution.state is ExecutionState.RUNNING
    assert asked.execution.instance_id == "inst-a"
    assert await store.cancel_requests([running.id, queued.id]) == {running.id: "cancelled: stop"}
    assert await store.cancel_requests([]) == {}
    with pytest.raises(ExecutionFinished):
        await store.request_cancel(queued.id, message="again", now=now)
    with pytest.raises(ExecutionNotFound):
        await store.request_cancel("0" * 28, message="", now=now)


async def test_executions_of_a_silent_instance_are_abandoned_and_their_slots_freed(
    store: SqlAlchemyStore,
) -> None:
    await store.create_job(a_job(max_concurrent=2), request_id=None)
    rows = [an_execution(scheduled_time=T0 + timedelta(seconds=n)) for n in range(3)]
    await store.insert_executions(rows)
    assert len(await claimed_ids(store, "inst-dead", limit=2)) == 2
    await store.record_progress([finish(rows[1], keeps_slot=True)])
    assert await store.execution_owners() == {"inst-dead"}
    abandoned = await store.abandon_instances(
        {"inst-dead": None}, message="abandoned", now=datetime.now(UTC)
    )
    assert [e.id for e in abandoned] == [rows[0].id]
    assert abandoned[0].state is ExecutionState.ABANDONED
    assert abandoned[0].error_message == "abandoned: instance inst-dead"
    assert await claimed_ids(store, "inst-b") == [rows[2].id]
    # Judged dead, it claims nothing more until it registers again.
    more = an_execution(scheduled_time=T0 + timedelta(seconds=9))
    await store.insert_executions([more])
    claim = await store.claim_executions(instance_id="inst-dead", limit=5, tasks=[TASK])
    assert claim.fenced and not claim.executions


def an_instance(instance_id: str) -> Instance:
    return Instance(
        id=instance_id,
        name="node",
        host="host",
        pid=1,
        version="0",
        address="127.0.0.1:1",
        insecure=False,
        start_time=datetime.now(UTC),
        max_running=10,
    )


async def beat(store: SqlAlchemyStore, instance_id: str) -> int:
    return await store.heartbeat_instance(instance_id, running=0, live_after=timedelta(seconds=10))


async def test_an_instance_is_fenced_only_while_as_silent_as_observed(
    store: SqlAlchemyStore,
) -> None:
    """The judge fences an instance whose heartbeat is still the one it watched; one that
    heartbeat meanwhile is left alone. A fenced instance's heartbeat says so (0), and it may
    claim again once it has registered again."""
    await store.create_job(a_job(max_concurrent=0), request_id=None)
    await store.register_instance(an_instance("inst-x"))
    seen = (await store.instance_heartbeats())["inst-x"]
    await store.insert_executions([an_execution()])
    assert len(await claimed_ids(store, "inst-x")) == 1
    # It heartbeats after the judge looked: the stale observation fences nothing.
    await asyncio.sleep(0.01)
    assert await beat(store, "inst-x") == 1
    now = datetime.now(UTC)
    assert await store.abandon_instances({"inst-x": seen}, message="gone", now=now) == []
    # Silent since the judge's last look: fenced, its run abandoned.
    seen = (await store.instance_heartbeats())["inst-x"]
    abandoned = await store.abandon_instances({"inst-x": seen}, message="gone", now=now)
    assert [e.state for e in abandoned] == [ExecutionState.ABANDONED]
    assert "inst-x" not in await store.instance_heartbeats()
    assert await beat(store, "inst-x") == 0
    await store.insert_executions([an_execution(scheduled_time=T0 + timedelta(seconds=1))])
    assert await claimed_ids(store, "inst-x") == []
    await store.register_instance(an_instance("inst-x"))
    assert len(await claimed_ids(store, "inst-x")) == 1
    assert await beat(store, "inst-x") == 1


async def test_a_claim_takes_no_more_than_its_limit(store: SqlAlchemyStore) -> None:
    await store.create_job(a_job(max_concurrent=0), request_id=None)
    rows = [an_execution(scheduled_time=T0 + timedelta(seconds=n)) for n in range(5)]
    await store.insert_executions(rows)
    assert await claimed_ids(store, limit=1) == [rows[0].id]
    assert await claimed_ids(store, limit=3) == [r.id for r in rows[1:4]]


async def test_a_queued_execution_left_behind_by_a_race_is_promoted(
    store: SqlAlchemyStore,
) -> None:
    """An admission that counted a slot just being freed queues its execution; the safety
    net makes it ready once the slot is free."""
    await store.create_job(a_job(), request_id=None)
    first, second = an_execution(), an_execution(scheduled_time=T0 + timedelta(minutes=1))
    await store.insert_executions([first])
    assert await claimed_ids(store) == [first.id]
    await store.insert_executions([second])  # queued: first holds the slot
    # first's slot freed by a writer that did not see second (as in a race).
    await store.record_progress([finish(first, keeps_slot=True)])
    async with store.engine.begin() as conn:
        await conn.exec_driver_sql(
            "UPDATE executions SET holds_slot = false WHERE id = ?"
            if store.engine.dialect.name == "sqlite"
            else "UPDATE executions SET holds_slot = false WHERE id = $1",
            (first.id,),
        )
    assert await claimed_ids(store) == []
    assert await store.promote_waiting() == 1
    assert await claimed_ids(store) == [second.id]
