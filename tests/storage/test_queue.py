"""The execution queue: claims, progress, cancel requests and the slots they take and free
(storage/abc/executions.py), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from storage.helpers import T0, TASK, a_job, an_execution, claimed_ids, finish

from chronoplane.server.errors import (
    ExecutionFinished,
    ExecutionNotFound,
)
from chronoplane.server.models import (
    Execution,
    ExecutionQuery,
    ExecutionSource,
    ExecutionState,
    Job,
)
from chronoplane.server.storage.abc import Admission, ExecutionFinish, SlotRelease
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore


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
